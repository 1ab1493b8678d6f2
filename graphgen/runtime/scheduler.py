"""Continuous batching: which sequences run next, how many of their tokens, and when they are done."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class Batch:
    """One step: seqs[i] computes the KV of its tokens [starts[i], starts[i] + num_tokens[i]) and,
    where that reaches its last token, samples the next one.

    kind: "prefill" (whole prompts, nothing in the pool yet but prefix-cache hits: the packed
    prefill graph), "decode" (one token per sequence, its last: the decode graph) or "mixed" (any
    other mix: chunks of prompts beside decode rows, the mixed graph).
    """

    seqs: list[Sequence] = field(default_factory=list)
    kind: str = "decode"
    starts: list[int] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    decode_rows: int = 0  # the first entries: running sequences whose last token alone lacks KV

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def sampling(self) -> list[Sequence]:
        """The sequences that sample a token this step, in step order."""
        if self.kind == "decode":
            return self.seqs
        return [s for s, start, n in zip(self.seqs, self.starts, self.num_tokens) if start + n == len(s)]

    def add(self, seq: Sequence, start: int, n: int) -> None:
        self.seqs.append(seq)
        self.starts.append(start)
        self.num_tokens.append(n)


class Scheduler:
    """Continuous batching over a paged KV pool, in one of two policies.

    Separate steps (step_tokens None; the NPU's graphs): prefill waiting prompts first, whole, as
    many as the token and block budgets allow, otherwise decode every running sequence.

    Mixed steps (step_tokens set; cpu/cuda artifacts, which have the mixed graph): every step
    decodes every running sequence whose prompt is done, then spends what is left of step_tokens
    on prompts: the rest of those already started, then new ones, a prompt chunked where it does
    not fit (vLLM's chunked prefill). A decode step of a few rows streams all the weights without
    keeping the cores busy; prompt tokens in the same step share that stream, and no long prompt
    stalls the decoding sequences for a whole prefill. With nothing decoding, a step takes whole
    prompts up to max_num_batched_tokens, as in the other policy.

    Either way, when the pool runs dry mid-decode the newest running sequence is preempted: its
    blocks are freed and it is recomputed later from all its tokens.

    decode_batch_sizes: the decode graph's batch buckets; the runner pads a batch up to
    `decode_bucket(n)`. require_padding_row keeps one padded row in every decode batch (the NPU
    advance-step op needs num_seqs > num_queries).
    """

    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, eos_token_id: int | list[int] | None = None,
                 decode_batch_sizes: list[int] | None = None, require_padding_row: bool = False,
                 step_tokens: int | None = None):
        for name, value in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens),
                            ("max_model_len", max_model_len)):
            if value < 1:
                raise ValueError(f"Scheduler {name} must be >= 1, got {value}")
        if step_tokens is not None and not max_num_seqs < step_tokens <= max_num_batched_tokens:
            raise ValueError(f"step_tokens={step_tokens}: a mixed step holds a decode row for each of up to "
                             f"max_num_seqs={max_num_seqs} sequences and prompt tokens besides, within "
                             f"max_num_batched_tokens={max_num_batched_tokens}: pick a value in between")
        self.block_manager = block_manager
        self.step_tokens = step_tokens
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

    def schedule(self) -> Batch:
        """The next step's work; an empty batch when nothing is left to run."""
        return self._schedule_separate() if self.step_tokens is None else self._schedule_mixed()

    def _schedule_separate(self) -> Batch:
        batch = Batch(kind="prefill")
        budget = self.max_num_batched_tokens
        while (seq := self._next_admission(budget, whole=True)) is not None:
            self._admit(seq)
            budget -= len(seq) - seq.num_cached_tokens
            self._take(batch, seq, len(seq) - seq.num_computed_tokens)
        if batch:
            return batch
        batch = Batch(kind="decode")
        for seq in self._decode_rows(list(self.running)):
            self._take(batch, seq, 1)
        batch.decode_rows = len(batch)
        return batch

    def _schedule_mixed(self) -> Batch:
        batch = Batch()
        decoding, prompting = [], []
        for seq in self.running:
            (decoding if len(seq) - seq.num_computed_tokens == 1 else prompting).append(seq)
        for seq in self._decode_rows(decoding):
            self._take(batch, seq, 1)
        batch.decode_rows = len(batch)
        chunking = bool(batch)  # with nothing decoding, prompts go whole (the packed prefill graph)
        budget = (self.step_tokens if chunking else self.max_num_batched_tokens) - len(batch)
        for seq in prompting:
            if seq.status is not SequenceStatus.RUNNING:  # preempted for a decode row's block
                continue
            if budget <= 0:
                break
            n = min(len(seq) - seq.num_computed_tokens, budget)
            self._take(batch, seq, n)
            budget -= n
        while (seq := self._next_admission(budget, whole=not chunking)) is not None:
            self._admit(seq)
            n = min(len(seq) - seq.num_computed_tokens, budget)
            self._take(batch, seq, n)
            budget -= n
        if len(batch) == batch.decode_rows:
            batch.kind = "decode"
        elif not batch.decode_rows and all(start == 0 and n == len(s) for s, start, n
                                           in zip(batch.seqs, batch.starts, batch.num_tokens)):
            batch.kind = "prefill"  # whole prompts, no prefix hits: the packed prefill graph
        else:
            batch.kind = "mixed"
        return batch

    def _next_admission(self, budget: int, *, whole: bool) -> Sequence | None:
        """The waiting sequence to admit next, if one may join now: a free running slot, its
        blocks, token budget left (for its whole prompt if `whole`). Finishes (abort) waiting
        sequences that can never run on the way."""
        while self.waiting and len(self.running) < self.max_running and budget > 0:
            seq = self.waiting[0]
            problem = self._never_fits(seq)
            if problem:
                self.finish(seq, "abort", problem)
                continue
            if (whole and len(seq) > budget) or not self.block_manager.can_allocate(seq):
                return None
            return seq
        return None

    def _admit(self, seq: Sequence) -> None:
        self.block_manager.allocate(seq)
        seq.num_computed_tokens = seq.num_cached_tokens
        seq.status = SequenceStatus.RUNNING
        self.waiting.popleft()
        self.running.append(seq)

    def _take(self, batch: Batch, seq: Sequence, n: int) -> None:
        """Put seq's next n tokens in the batch; from now on their blocks may serve prefix hits."""
        start = seq.num_computed_tokens
        batch.add(seq, start, n)
        seq.num_computed_tokens = start + n
        bs = self.block_manager.block_size
        if (start + n) // bs > start // bs:  # fills a block
            self.block_manager.mark_computed(seq, start, start + n)

    def _decode_rows(self, seqs: list[Sequence]) -> list[Sequence]:
        """seqs (running, in order) that get the block for their last token, preempting the newest
        running sequences while the pool has none to give."""
        rows = []
        for seq in seqs:
            if seq.status is not SequenceStatus.RUNNING:  # preempted below to make room for an older one
                continue
            while not self.block_manager.can_append(seq):
                newest = self.running[-1]
                if newest is not seq:
                    self.preempt(newest)
                elif rows:
                    self.preempt(seq)  # seq itself is the newest left
                    break
                else:
                    self.finish(seq, "abort", self._pool_exhausted(seq))
                    break
            else:
                self.block_manager.may_append(seq)
                rows.append(seq)
        return rows

    def _pool_exhausted(self, seq: Sequence) -> str:
        bm = self.block_manager
        return (f"sequence reached {len(seq)} tokens and needs another KV block, but the whole pool "
                f"({bm.num_usable_blocks} blocks of {bm.block_size} tokens) is in use by it: "
                f"raise num_blocks / kv_cache_memory or lower max_tokens")

    def preempt(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.running.remove(seq)
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
