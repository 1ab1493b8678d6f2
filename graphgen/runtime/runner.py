"""Runs the artifact's graphs over the KV pools: builds and pads their inputs, calls them, and moves
the decode inputs forward in place with `npu_advance_step_flashattn` between steps."""
from __future__ import annotations

import torch

from ..artifact import Manifest
from ..ops.advance_step import advance_rows
from ..spec import DTYPES, cache_input_names
from .block_manager import BlockManager
from .graphs import HeadedGraph, huge_page_buffer, load_graphs
from .sequence import Sequence

I64 = torch.int64


class ModelRunner:
    """The KV pools and the graphs of one artifact.

    Decode inputs live in persistent tensors sized to the largest decode bucket plus one row. The
    graphs see the first `bucket` rows; the advance-step op sees one more, a padding row past the
    graph's batch, which meets its num_seqs > num_queries rule without the graph computing a
    padded row (batch 1 decodes as batch 1). After a step the
    advance-step op writes the sampled tokens, positions, lengths and slots into them; the next
    step reuses them as they are when the batch is the same sequences in the same order, and only
    patches rows whose block table grew. Any other batch is rebuilt from the sequences.
    """

    def __init__(self, manifest: Manifest, block_manager: BlockManager, device: torch.device):
        self.spec = manifest.kv
        self.bm = block_manager
        self.device = device
        self.graphs = load_graphs(manifest, device)
        # The KV pool is allocated after the graphs exist (they share the device's memory).
        dtype = DTYPES[self.spec.dtype]
        self.pools = [kv_pool(self.spec.pool_shape(block_manager.num_blocks), dtype, device)
                      for _ in cache_input_names(self.spec.num_layers)]
        # NPU graphs compile per bucket now, with the real pools, never on a first request.
        for graph in self.graphs.values():
            if hasattr(graph, "warm_up"):
                graph.warm_up(self.pools, block_manager.scratch_block, self.spec.block_size,
                              self.spec.max_blocks_per_seq)
        # npu: PFA lengths are constants per bucket, so prefill runs one sequence per graph call.
        self.prefill_per_sequence = manifest.graphs["prefill"].get("packing") == "per_sequence"
        self.max_batch = max(manifest.graphs["decode"]["batch_sizes"])
        self.token_buckets = manifest.graphs["prefill"].get("token_buckets")
        self.scratch_row = torch.full((self.spec.max_blocks_per_seq,), block_manager.scratch_block, dtype=torch.int32)
        b, m = self.max_batch + 1, self.spec.max_blocks_per_seq
        self.input_ids = torch.zeros(b, dtype=I64, device=device)
        self.positions = torch.zeros(b, dtype=I64, device=device)
        self.seq_lens = torch.ones(b, dtype=I64, device=device)
        self.slot_mapping = torch.full((b,), block_manager.scratch_slot, dtype=I64, device=device)
        self.block_table = self.scratch_row.repeat(b, 1).to(device)
        self._rows: list[int] = []  # seq_id per row as of the last advance step
        self._table_lens: list[int] = []
        # Every graph leaves its LM head to the runtime and the head's greedy kernel runs here: the
        # step methods can return each sequence's argmax token (greedy=True) instead of its logits.
        self.greedy_tokens = all(isinstance(g, HeadedGraph) and g.head.greedy for g in self.graphs.values())

    def _run(self, phase: str, inputs: tuple, rows: int | None, greedy: bool) -> torch.Tensor:
        """The `phase` graph's logits (all its rows), or with `greedy` the argmax tokens of its first `rows`."""
        graph = self.graphs[phase]
        if not greedy:
            return graph(*inputs)
        if not self.greedy_tokens:
            raise ValueError("greedy tokens need graphs that leave the LM head to the runtime (runner.greedy_tokens)")
        return graph.greedy(rows, *inputs)

    # --- prefill ---------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, seqs: list[Sequence], *, greedy: bool = False) -> torch.Tensor:
        """Logits (len(seqs), V) at each sequence's last token (greedy: the argmax token of each,
        (len(seqs),) int64, where `greedy_tokens`; likewise for `mixed` and `decode`). Sequences with a
        prefix-cache hit run after the packed prefill has written its KV (so a hit on a block filled in this same
        batch reads finished data): all at once through the mixed graph (cpu/cuda), else one by
        one through the extend graph (npu)."""
        # Without either (npu, block_size not a multiple of 128) a hit recomputes its prompt.
        paged = "mixed" in self.graphs or "extend" in self.graphs
        fresh = [s for s in seqs if s.num_cached_tokens == 0 or not paged]
        hits = [s for s in seqs if s.num_cached_tokens and paged]
        logits: dict[int, torch.Tensor] = {}
        for group in ([[s] for s in fresh] if self.prefill_per_sequence else [fresh] if fresh else []):
            for seq, row in zip(group, self._packed_prefill(group, greedy)):
                logits[seq.seq_id] = row
        if hits and "mixed" in self.graphs:
            rows = self.mixed([(s, s.num_cached_tokens, len(s) - s.num_cached_tokens) for s in hits], greedy=greedy)
            logits.update((s.seq_id, row) for s, row in zip(hits, rows))
        else:
            logits.update((s.seq_id, self._extend(s, greedy)) for s in hits)
        return torch.stack([logits[s.seq_id] for s in seqs])

    @torch.no_grad()
    def mixed(self, chunks: list[tuple[Sequence, int, int]], *, greedy: bool = False) -> torch.Tensor:
        """One step of the mixed graph: each (seq, start, n) computes seq's tokens [start, start +
        n) over the KV of those before them. Logits (K, V) for the chunks that reach their
        sequence's last token, in order (K = 0: an empty tensor)."""
        ids, pos, slots, ends, kv_lens, last = [], [], [], [], [], []
        for seq, start, n in chunks:
            ids += seq.token_ids[start:start + n]
            pos += range(start, start + n)
            slots += self.bm.slots(seq, start, start + n)
            ends.append(len(ids))
            kv_lens.append(start + n)
            if start + n == len(seq):
                last.append(len(ids) - 1)
        t = lambda xs: torch.tensor(xs, dtype=I64, device=self.device)  # noqa: E731
        table = self._table_rows([seq for seq, _, _ in chunks])
        # The graph returns at least one row: with no chunk sampling, that of the last token, unused.
        inputs = (t(ids)[None], t(pos)[None], t(last or [len(ids) - 1]), t(ends), table, t(kv_lens), t(slots),
                  *self.pools)
        return self._run("mixed", inputs, len(last), greedy)[:len(last)]

    def _packed_prefill(self, seqs: list[Sequence], greedy: bool) -> torch.Tensor:
        ids, pos, slots, ends = [], [], [], []
        for seq in seqs:
            n = len(seq)
            ids += seq.token_ids
            pos += range(n)
            slots += self.bm.slots(seq, 0, n)
            ends.append(len(ids))
        total = len(ids)
        padded = self._token_bucket(total)
        if padded > total:  # one dummy sequence whose KV goes to the scratch block
            pad = padded - total
            ids += [0] * pad
            pos += range(pad)
            slots += [self.bm.scratch_slot + i % self.spec.block_size for i in range(pad)]
            ends.append(padded)
        t = lambda xs: torch.tensor(xs, dtype=I64, device=self.device)  # noqa: E731
        last = [e - 1 for e in ends[:len(seqs)]]
        return self._run("prefill", (t(ids)[None], t(pos)[None], t(last), t(ends), t(slots), *self.pools), len(last),
                         greedy)

    def _token_bucket(self, total: int) -> int:
        if not self.token_buckets:
            return total
        for size in self.token_buckets:
            if size >= total:
                return size
        raise ValueError(f"prefill of {total} tokens exceeds the largest prefill bucket {self.token_buckets[-1]}")

    def _extend(self, seq: Sequence, greedy: bool) -> torch.Tensor:
        start, n = seq.num_cached_tokens, len(seq)
        t = lambda xs: torch.tensor(xs, dtype=I64, device=self.device)  # noqa: E731
        table = self._table_rows([seq])
        inputs = (t(seq.token_ids[start:])[None], t(range(start, n))[None], t([n - start - 1]), table, t([n]),
                  t(self.bm.slots(seq, start, n)), *self.pools)
        return self._run("extend", inputs, 1, greedy)[0]

    def _table_rows(self, seqs: list[Sequence]) -> torch.Tensor:
        """The sequences' block tables (len(seqs), max_blocks_per_seq) int32, padded with the scratch
        block: one tensor built from lists (a clone and a copy per row cost ~4x as much)."""
        m, pad = self.spec.max_blocks_per_seq, self.bm.scratch_block
        if any(len(s.block_table) > m for s in seqs):
            raise ValueError(f"a block table is longer than max_blocks_per_seq ({m})")
        return torch.tensor([s.block_table + [pad] * (m - len(s.block_table)) for s in seqs],
                            dtype=torch.int32).to(self.device)

    # --- decode ----------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, seqs: list[Sequence], bucket: int, *, greedy: bool = False) -> torch.Tensor:
        """Logits (bucket, V) for one new token per sequence; rows past len(seqs) are padding
        (greedy: the argmax tokens (len(seqs),))."""
        if [s.seq_id for s in seqs] == self._rows:
            self._patch_grown_tables(seqs)
        else:
            self._rebuild(seqs)
        b = bucket
        inputs = (self.input_ids[:b, None], self.positions[:b, None], self.block_table[:b], self.seq_lens[:b],
                  self.slot_mapping[:b], *self.pools)
        return self._run("decode", inputs, len(seqs), greedy)

    def _rebuild(self, seqs: list[Sequence]) -> None:
        n = len(seqs)
        self.input_ids.zero_()
        self.positions.zero_()
        self.seq_lens.fill_(1)  # padding rows: length 1 in the scratch block
        self.slot_mapping.fill_(self.bm.scratch_slot)
        self.block_table.copy_(self.scratch_row.expand_as(self.block_table))
        if n:
            t = lambda xs: torch.tensor(xs, dtype=I64, device=self.device)  # noqa: E731
            self.input_ids[:n] = t([s.last_token for s in seqs])
            self.positions[:n] = t([len(s) - 1 for s in seqs])
            self.seq_lens[:n] = t([len(s) for s in seqs])
            self.slot_mapping[:n] = t([self.bm.slot(s, len(s) - 1) for s in seqs])
            self.block_table[:n] = self._table_rows(seqs)
        self._rows = [s.seq_id for s in seqs]
        self._table_lens = [len(s.block_table) for s in seqs]

    def _patch_grown_tables(self, seqs: list[Sequence]) -> None:
        """A sequence that crossed into a new block since the advance step: write the new table
        entry and its slot (the advance step read the table before the block existed)."""
        for i, seq in enumerate(seqs):
            if len(seq.block_table) != self._table_lens[i]:
                self.block_table[i] = self._table_rows([seq])[0]
                self.slot_mapping[i] = self.bm.slot(seq, len(seq) - 1)
                self._table_lens[i] = len(seq.block_table)

    @torch.no_grad()
    def advance(self, seqs: list[Sequence], sampled: torch.Tensor, bucket: int) -> None:
        """Move the decode inputs of `seqs` (rows 0..n-1 of a `bucket`-row batch) to their next
        token in place: the vLLM step the NPU runs eagerly between graph calls."""
        rows = bucket + 1  # rows past len(seqs) are padding, left as they are
        args = (self.input_ids[:rows], sampled.to(device=self.device, dtype=I64), self.positions[:rows],
                self.seq_lens[:rows], self.slot_mapping[:rows], self.block_table[:rows])
        if self.device.type == "npu":  # the device op, as the deployment runs it
            torch.ops.graphgen.npu_advance_step_flashattn(*args, rows, len(seqs), self.spec.block_size)
        else:  # the same update without the op's checks and dispatch: inputs this runner keeps valid
            advance_rows(*args, len(seqs), self.spec.block_size)
        self._rows = [s.seq_id for s in seqs]

    def forget_decode_batch(self) -> None:
        """Force the next decode to rebuild its inputs (after a prefill changed the running set)."""
        self._rows = []


def kv_pool(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed pool. On the CPU, on transparent huge pages: attention reads the next sequence's
    blocks ahead of use, and across 4 KB pages those requests wait on TLB misses (bench-125m graph
    calls, one process: 16-row decode steps ~0.3 ms faster, 64-row mixed steps ~0.4 ms)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = dtype.itemsize * torch.Size(shape).numel()
    return huge_page_buffer(nbytes).view(dtype).view(shape).zero_()
