"""`graphgen::packed_causal_attention`: causal attention within each sequence of a packed prefill,
the CPU form of the prefill graph's `npu_prompt_flash_attention` call (decompositions.py).

query (T, N, D), key and value (T, Nkv, D) in any strides, N a multiple of Nkv; cu_seq_lens (K,)
int32 or int64, the sequences' cumulative ends -> (T, N, D), query's dtype. Token i of sequence s
sees the tokens j of its own sequence with j <= i; query head n reads KV head n // (N // Nkv);
tokens from the last end on (a bucket's padding) are zeros.

On the CPU this is one of graphgen's kernels (csrc/packed_causal.cpp, ops/cpu_kernels.py): ATen's
flash attention once per sequence, so a prefill of many sequences computes only their own scores.
Elsewhere, or where the kernels cannot be built, `masked_packed_causal` computes the same as one
attention over all T tokens with a block-diagonal causal mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_kernels
from ._checks import known_true
from ._core import compute_dtype

DTYPES = (torch.float32, torch.bfloat16)


@torch.library.custom_op("graphgen::packed_causal_attention", mutates_args=())
def packed_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_lens: torch.Tensor,
                            scale: float) -> torch.Tensor:
    _check(query, key, value, cu_seq_lens)
    if kernel_runs(query):
        return cpu_kernels.call("packed_causal_attention", [query, key, value, cu_seq_lens], scale)
    return masked_packed_causal(query, key, value, cu_seq_lens, scale=scale)


@packed_causal_attention.register_fake
def _(query, key, value, cu_seq_lens, scale):
    _check(query, key, value, cu_seq_lens)
    return torch.empty_like(query, memory_format=torch.contiguous_format)


def kernel_runs(query: torch.Tensor) -> bool:
    """Whether graphgen's CPU kernel computes this call (else `masked_packed_causal` does)."""
    return query.device.type == "cpu" and query.dtype in DTYPES and cpu_kernels.available()


def masked_packed_causal(query, key, value, cu_seq_lens, *, scale: float, pre_tokens: int | None = None) -> torch.Tensor:
    """The op as one `scaled_dot_product_attention` over all T tokens with a (T, T) mask: token i
    sees token j of its own sequence when j <= i (and i - j <= pre_tokens, a band)."""
    t, n, _ = query.shape
    ct = compute_dtype(query)
    pos = torch.arange(t, device=query.device)
    ends = cu_seq_lens.to(torch.int64)
    seg = torch.searchsorted(ends, pos, right=True)  # sequence of each token (K past the end)
    i, j = pos.view(t, 1), pos.view(1, t)
    mask = (seg.view(t, 1) == seg.view(1, t)) & (j <= i)
    if pre_tokens is not None:
        mask = mask & (i - j <= pre_tokens)
    g = n // key.shape[1]
    q = query.to(ct).transpose(0, 1).unsqueeze(0)  # (1, N, T, D)
    k = key.to(ct).transpose(0, 1).repeat_interleave(g, dim=0).unsqueeze(0)
    v = value.to(ct).transpose(0, 1).repeat_interleave(g, dim=0).unsqueeze(0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)[0].transpose(0, 1)
    inside = (seg < ends.shape[0]).view(t, 1, 1)
    return torch.where(inside, out, torch.zeros_like(out)).to(query.dtype)


def _check(query, key, value, cu_seq_lens) -> None:
    if query.dim() != 3 or key.dim() != 3 or value.dim() != 3 or cu_seq_lens.dim() != 1:
        raise ValueError("packed_causal_attention: query (T, N, D), key and value (T, Nkv, D), cu_seq_lens (K,) "
                         f"expected, got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}, "
                         f"{tuple(cu_seq_lens.shape)}")
    misfits = [key.shape[0] != query.shape[0], value.shape != key.shape, key.shape[2] != query.shape[2],
               key.shape[1] == 0 or query.shape[1] % key.shape[1] != 0]
    if any(known_true(c) for c in misfits):  # what tracing cannot decide is left to the eager call
        raise ValueError(f"packed_causal_attention: query {tuple(query.shape)} does not fit key "
                         f"{tuple(key.shape)} and value {tuple(value.shape)}")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise ValueError(f"packed_causal_attention: query, key and value share a dtype, got {query.dtype}, "
                         f"{key.dtype}, {value.dtype}")
    if cu_seq_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"packed_causal_attention: cu_seq_lens must be int32 or int64, got {cu_seq_lens.dtype}")
