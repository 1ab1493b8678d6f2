"""`npu_advance_step_flashattn`: vLLM's advance_step for flash attention, in place.

For each of the first `num_queries` sequences i (pos = the old seq_lens[i]):
    input_tokens[i] = sampled_token_ids[i]; input_positions[i] = pos; seq_lens[i] = pos + 1
    slot_mapping[i] = block_tables[i, pos // block_size] * block_size + pos % block_size
Rows num_queries..num_seqs-1 are left untouched. The runtime's decode loop calls it between steps
so decode inputs are updated on device instead of rebuilt in Python (DESIGN.md decision 7).
Upstream has no graph converter for it (it runs eagerly beside compiled graphs); here it also
traces (torch.compile / torch.export) because every mutated argument is declared.
"""
from __future__ import annotations

import torch

from ._checks import fail
from ._registry import define

OP = "npu_advance_step_flashattn"
SCHEMA = (
    "(Tensor(a!) input_tokens, Tensor sampled_token_ids, Tensor(b!) input_positions, Tensor(c!) seq_lens, "
    "Tensor(d!) slot_mapping, Tensor block_tables, int num_seqs, int num_queries, int block_size) -> ()"
)
define(OP, SCHEMA)


def _check(input_tokens, sampled_token_ids, input_positions, seq_lens, slot_mapping, block_tables,
           num_seqs, num_queries, block_size) -> None:
    if num_queries <= 0 or block_size <= 0:
        fail(OP, "num_queries/block_size", f"are {num_queries}/{block_size}", "pass positive integers")
    if not num_seqs > num_queries:
        fail(OP, "num_seqs", f"({num_seqs}) must be greater than num_queries ({num_queries})",
             "keep at least one padding row in the decode batch (the device op requires num_seqs > num_queries)")
    for name, t in (("input_tokens", input_tokens), ("input_positions", input_positions),
                    ("seq_lens", seq_lens), ("slot_mapping", slot_mapping)):
        if t.dtype != torch.int64:
            fail(OP, name, f"has dtype {t.dtype}", f"pass {name}.to(torch.int64)")
        if t.dim() not in (1, 2) or t.shape[0] != num_seqs or (t.dim() == 2 and t.shape[1] != 1):
            fail(OP, name, f"has shape {tuple(t.shape)}", f"pass shape ({num_seqs},) (num_seqs,)")
    if sampled_token_ids.dtype != torch.int64:
        fail(OP, "sampled_token_ids", f"has dtype {sampled_token_ids.dtype}", "pass sampled_token_ids.to(torch.int64)")
    s = tuple(sampled_token_ids.shape)
    if not (s == (num_queries,) or s == (num_queries, 1)):
        fail(OP, "sampled_token_ids", f"has shape {s}", f"pass ({num_queries}, 1) or ({num_queries},) (num_queries)")
    if block_tables.dtype not in (torch.int32, torch.int64):
        fail(OP, "block_tables", f"has dtype {block_tables.dtype}", "pass int32 or int64 block tables")
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        fail(OP, "block_tables", f"has shape {tuple(block_tables.shape)}",
             f"pass a 2-D (num_seqs={num_seqs}, max_blocks_per_seq) table")


@torch.library.impl(f"graphgen::{OP}", "CompositeExplicitAutograd")
def npu_advance_step_flashattn(input_tokens, sampled_token_ids, input_positions, seq_lens, slot_mapping,
                               block_tables, num_seqs, num_queries, block_size) -> None:
    _check(input_tokens, sampled_token_ids, input_positions, seq_lens, slot_mapping, block_tables,
           num_seqs, num_queries, block_size)
    pos = seq_lens.view(-1)[:num_queries]
    reach = int(pos.max()) // block_size
    if reach >= block_tables.shape[1]:
        fail(OP, "block_tables", f"has {block_tables.shape[1]} columns but a sequence reaches position "
             f"{int(pos.max())} (block {reach})", "allocate the next block before advancing")
    advance_rows(input_tokens, sampled_token_ids, input_positions, seq_lens, slot_mapping, block_tables,
                 num_queries, block_size)


def advance_rows(input_tokens, sampled_token_ids, input_positions, seq_lens, slot_mapping, block_tables,
                 num_queries: int, block_size: int) -> None:
    """The op's update without its checks, for a caller that keeps the inputs valid: the runtime
    between every two decode steps of a CPU/CUDA artifact (the op's checks and dispatch were about
    a third of a tiny model's step). Few tensor ops, all in place."""
    q = num_queries
    pos = seq_lens.view(-1)[:q]
    col = torch.div(pos, block_size, rounding_mode="floor")
    block = block_tables[:q].gather(1, col.view(q, 1)).view(q)
    input_positions.view(-1)[:q].copy_(pos)  # before seq_lens moves on (pos is a view of it)
    slot_mapping.view(-1)[:q].copy_(torch.add(pos, block - col, alpha=block_size))  # block*bs + pos % bs
    input_tokens.view(-1)[:q].copy_(sampled_token_ids.view(-1))
    pos.add_(1)


@torch.library.register_fake(f"graphgen::{OP}")
def _fake(input_tokens, sampled_token_ids, input_positions, seq_lens, slot_mapping, block_tables,
          num_seqs, num_queries, block_size) -> None:
    _check(input_tokens, sampled_token_ids, input_positions, seq_lens, slot_mapping, block_tables,
           num_seqs, num_queries, block_size)
