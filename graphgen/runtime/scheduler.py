"""Continuous batching: which sequences run next, prefill or decode, and when they are done."""
from __future__ import annotations

from collections import deque

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


class Scheduler:
    """Prefill waiting prompts first (as many as the token and block budgets allow), otherwise
    decode every running sequence. When the pool runs dry mid-decode, the newest running sequence
    is preempted: its blocks are freed and it is recomputed later from all its tokens.

    decode_batch_sizes: the decode graph's batch buckets; the runner pads a batch up to
    `decode_bucket(n)`. require_padding_row keeps one padded row in every decode batch (the NPU
    advance-step op needs num_seqs > num_queries).
    """

    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, eos_token_id: int | list[int] | None = None,
                 decode_batch_sizes: list[int] | None = None, require_padding_row: bool = False):
        for name, value in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens),
                            ("max_model_len", max_model_len)):
            if value < 1:
                raise ValueError(f"Scheduler {name} must be >= 1, got {value}")
        self.block_manager = block_manager
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or ())
        self.decode_batch_sizes = sorted(set(decode_batch_sizes or [max_num_seqs + require_padding_row]))
        self.require_padding_row = require_padding_row
        # Running sequences all decode together, so they must fit the largest bucket.
        self.max_running = min(max_num_seqs, self.decode_batch_sizes[-1] - require_padding_row)
        if self.max_running < 1 or self.decode_batch_sizes[0] < 1:
            raise ValueError(f"no decode batch fits: max_num_seqs={max_num_seqs}, decode_batch_sizes="
                             f"{self.decode_batch_sizes}, require_padding_row={require_padding_row}; "
                             f"compile a decode bucket of at least {1 + require_padding_row}")
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.finished: list[Sequence] = []

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def decode_bucket(self, num_seqs: int) -> int:
        """The decode batch size the runner pads num_seqs running sequences to."""
        need = num_seqs + self.require_padding_row
        for size in self.decode_batch_sizes:
            if size >= need:
                return size
        raise ValueError(f"decode batch of {num_seqs} exceeds the largest bucket {self.decode_batch_sizes[-1]}")

    def add(self, seq: Sequence) -> None:
        """Queue seq, or finish it at once (finish_reason "abort", seq.error) if it can never run."""
        problem = self._never_fits(seq)
        if problem:
            self.finish(seq, "abort", problem)
        else:
            self.waiting.append(seq)

    def _never_fits(self, seq: Sequence) -> str | None:
        n, bm = len(seq), self.block_manager
        what = "prompt" if seq.num_completion_tokens == 0 else "preempted sequence (prompt + generated)"
        if seq.num_prompt_tokens == 0:
            return "empty prompt: give at least one token"
        if n > self.max_model_len:
            return (f"{what} has {n} tokens but max_model_len is {self.max_model_len}: "
                    f"shorten it or compile with a larger max_model_len")
        if n > self.max_num_batched_tokens:
            return (f"{what} has {n} tokens but max_num_batched_tokens is {self.max_num_batched_tokens}: "
                    f"shorten it or raise max_num_batched_tokens")
        if seq.num_blocks(bm.block_size) > bm.num_usable_blocks:
            return (f"{what} of {n} tokens needs {seq.num_blocks(bm.block_size)} KV blocks of "
                    f"{bm.block_size} tokens but the pool has {bm.num_usable_blocks}: "
                    f"raise num_blocks / kv_cache_memory or shorten it")
        return None

    def schedule(self) -> tuple[list[Sequence], bool]:
        """The next batch and whether it is a prefill. Empty when nothing is left to run."""
        scheduled, num_batched_tokens = [], 0
        while self.waiting and len(self.running) < self.max_running:
            seq = self.waiting[0]
            problem = self._never_fits(seq)
            if problem:
                self.finish(seq, "abort", problem)
                continue
            if (num_batched_tokens + len(seq) > self.max_num_batched_tokens
                    or not self.block_manager.can_allocate(seq)):
                break
            self.block_manager.allocate(seq)
            num_batched_tokens += len(seq) - seq.num_cached_tokens
            seq.status = SequenceStatus.RUNNING
            self.waiting.popleft()
            self.running.append(seq)
            scheduled.append(seq)
        if scheduled:
            return scheduled, True

        while self.running:
            seq = self.running.popleft()
            while not self.block_manager.can_append(seq):
                if self.running:
                    self.preempt(self.running.pop())  # the newest goes
                elif scheduled:
                    self.preempt(seq)  # seq itself is the newest left
                    break
                else:
                    self.finish(seq, "abort", self._pool_exhausted(seq))
                    break
            else:
                self.block_manager.may_append(seq)
                scheduled.append(seq)
        self.running.extendleft(reversed(scheduled))
        return scheduled, False

    def _pool_exhausted(self, seq: Sequence) -> str:
        bm = self.block_manager
        return (f"sequence reached {len(seq)} tokens and needs another KV block, but the whole pool "
                f"({bm.num_usable_blocks} blocks of {bm.block_size} tokens) is in use by it: "
                f"raise num_blocks / kv_cache_memory or lower max_tokens")

    def preempt(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.block_manager.deallocate(seq)
        self.waiting.appendleft(seq)

    def postprocess(self, seqs: list[Sequence], token_ids: list[int]) -> None:
        """Append each sequence's sampled token; finish those that hit EOS, a stop token id,
        max_tokens or max_model_len."""
        for seq, token_id in zip(seqs, token_ids):
            if seq.is_finished:  # aborted while its step ran
                continue
            token_id = int(token_id)
            seq.append_token(token_id)
            params = seq.sampling_params
            if (token_id in self.eos_token_ids and not params.ignore_eos) or token_id in params.stop_token_ids:
                self.finish(seq, "stop")
            elif seq.num_completion_tokens >= params.max_tokens or len(seq) >= self.max_model_len:
                self.finish(seq, "length")

    def finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        """End seq (also used by the engine for stop strings), free its blocks, report it once."""
        if seq.is_finished:
            return
        for queue in (self.running, self.waiting):
            if seq in queue:
                queue.remove(seq)
        self.block_manager.deallocate(seq)  # a no-op when it holds no blocks
        seq.status, seq.finish_reason, seq.error = SequenceStatus.FINISHED, reason, error
        self.finished.append(seq)

    def abort(self, request_id: str) -> bool:
        """Finish the request with finish_reason "abort"; False if no such live request."""
        for seq in (*self.waiting, *self.running):
            if seq.request_id == request_id:
                self.finish(seq, "abort")
                return True
        return False

    def pop_finished(self) -> list[Sequence]:
        """Sequences finished since the last call, whatever ended them."""
        done, self.finished = self.finished, []
        return done
