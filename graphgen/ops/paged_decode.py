"""`graphgen::paged_decode_attention`: one decode token per sequence attending over its paged KV
cache, the CPU form of the decode graph's `npu_incre_flash_attention` call (decompositions.py).

query (B, N, D); key_cache, value_cache (NB, block_size, Nkv, D) in any strides (a BSH pool
(NB, bs, Nkv*D) viewed, or a BNSD pool (NB, Nkv, bs, D) transposed); block_table (B, M) and
seq_lens (B,) int32 or int64 -> (B, N, D), query's dtype. Query head n reads KV head
n // (N // Nkv); sequence b sees its first seq_lens[b] positions, through block_table[b]; a row
with length 0 is zeros. Scores, softmax and the weighted sum are fp32.

On the CPU this is one of graphgen's kernels (csrc/paged_decode.cpp, ops/cpu_kernels.py): it reads
only the visible positions, straight from the pool, parallel over (sequence, KV head). Elsewhere,
or where the kernels cannot be built, `aten_paged_decode` computes the same in ATen.
"""
from __future__ import annotations

import torch

from . import cpu_kernels
from ._checks import known_true
from ._core import compute_dtype

DTYPES = (torch.float32, torch.bfloat16)


@torch.library.custom_op("graphgen::paged_decode_attention", mutates_args=())
def paged_decode_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    _check(query, key_cache, value_cache, block_table, seq_lens)
    if kernel_runs(query):
        return cpu_kernels.call("paged_decode_attention", [query, key_cache, value_cache, block_table, seq_lens], scale)
    return aten_paged_decode(query, key_cache, value_cache, block_table, seq_lens, scale)


@paged_decode_attention.register_fake
def _(query, key_cache, value_cache, block_table, seq_lens, scale):
    _check(query, key_cache, value_cache, block_table, seq_lens)
    return torch.empty_like(query, memory_format=torch.contiguous_format)


def kernel_runs(query: torch.Tensor) -> bool:
    """Whether graphgen's CPU kernel computes this call (else ATen does)."""
    return query.device.type == "cpu" and query.dtype in DTYPES and cpu_kernels.available()


def aten_paged_decode(query, key_cache, value_cache, block_table, seq_lens, scale: float) -> torch.Tensor:
    """The op in ATen: gathers every block of the table (entries past a row's last block read block
    0, masked), fp32 softmax over positions < seq_len."""
    b, n, d = query.shape
    _, bs, nkv, _ = key_cache.shape
    table = block_table.to(torch.int64)
    m = table.shape[1]
    lens = seq_lens.to(torch.int64)
    needed = torch.arange(m, device=table.device).view(1, m) < ((lens + bs - 1) // bs).view(b, 1)
    table = torch.where(needed, table, torch.zeros_like(table))
    ct = compute_dtype(query)
    k_t = key_cache[table].reshape(b, m * bs, nkv, d).permute(0, 2, 3, 1).to(ct)  # (B, Nkv, D, S)
    v = value_cache[table].reshape(b, m * bs, nkv, d).transpose(1, 2).to(ct)  # (B, Nkv, S, D)
    qg = query.to(ct).reshape(b, nkv, n // nkv, d)
    logits = torch.matmul(qg, k_t) * scale  # (B, Nkv, G, S)
    visible = torch.arange(m * bs, device=query.device).view(1, 1, 1, -1) < lens.view(b, 1, 1, 1)
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    probs = torch.where(lens.view(b, 1, 1, 1) > 0, probs, torch.zeros_like(probs))
    return torch.matmul(probs, v).to(query.dtype).reshape(b, n, d)


def token_rows(cu_seq_lens: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, total):
    """Packed new tokens of B paged sequences as one decode row each: sequence b's new tokens end
    at cu_seq_lens[b] (cumulative, no leading 0) and its KV, those tokens included, is seq_lens[b]
    long, so its token at packed index t sees the first seq_lens[b] - cu_seq_lens[b] + t + 1
    positions (bottom-right causal). -> (block_table rows (total, M), lengths (total,) int64);
    tokens past the last end get length 0 (zero rows in the paged ops)."""
    t = torch.arange(total, device=cu_seq_lens.device)
    ends = cu_seq_lens.to(torch.int64)
    seq = (t[:, None] >= ends[None, :]).sum(1)  # which sequence each token belongs to
    past = seq >= ends.shape[0]
    seq = seq.clamp(max=ends.shape[0] - 1)
    lens = seq_lens.to(torch.int64)[seq] - ends[seq] + t + 1
    return block_table[seq], torch.where(past, torch.zeros_like(lens), lens)


def _check(query, key_cache, value_cache, block_table, seq_lens) -> None:
    if query.dim() != 3 or key_cache.dim() != 4 or block_table.dim() != 2 or seq_lens.dim() != 1:
        raise ValueError("paged_decode_attention: query (B, N, D), caches (NB, block_size, Nkv, D), block_table "
                         f"(B, M), seq_lens (B,) expected, got {tuple(query.shape)}, {tuple(key_cache.shape)}, "
                         f"{tuple(block_table.shape)}, {tuple(seq_lens.shape)}")
    b, n, d = query.shape
    misfits = [v != k for v, k in zip(value_cache.shape, key_cache.shape)] + [
        key_cache.shape[3] != d, n % key_cache.shape[2] != 0, block_table.shape[0] != b, seq_lens.shape[0] != b]
    if any(known_true(c) for c in misfits):  # what tracing cannot decide is left to the eager call
        raise ValueError(f"paged_decode_attention: query {tuple(query.shape)} does not fit key_cache "
                         f"{tuple(key_cache.shape)}, value_cache {tuple(value_cache.shape)}, block_table "
                         f"{tuple(block_table.shape)}, seq_lens {tuple(seq_lens.shape)}")
    if key_cache.dtype != query.dtype or value_cache.dtype != query.dtype:
        raise ValueError(f"paged_decode_attention: query and caches share a dtype, got {query.dtype}, "
                         f"{key_cache.dtype}, {value_cache.dtype}")
    for name, t in (("block_table", block_table), ("seq_lens", seq_lens)):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"paged_decode_attention: {name} must be int32 or int64, got {t.dtype}")
