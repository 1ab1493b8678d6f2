"""Tensor plumbing shared by IFA, PFA and FIA: layouts <-> BNSD, varlen (TND) <-> padded batches,
paged KV gather, per-batch row gathers (left padding), int8 antiquant and int8 output quant.

All of it is vectorized (gather / index_select / advanced indexing); nothing loops per token or
per head. Shapes: B batch, N query heads, Nkv key/value heads, S sequence, D head dim, H = N*D.
"""
from __future__ import annotations

import torch


def to_bnsd(x: torch.Tensor, layout: str, heads: int) -> torch.Tensor:
    """(B,S,H) / (B,N,S,D) / (B,S,N,D) -> (B,N,S,D) (a view where possible)."""
    if layout == "BSH":
        b, s, h = x.shape
        return x.view(b, s, heads, h // heads).transpose(1, 2)
    if layout == "BSND":
        return x.transpose(1, 2)
    return x  # BNSD


def from_bnsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    """(B,N,S,D) -> the layout (contiguous)."""
    if layout == "BSH":
        b, n, s, d = x.shape
        return x.transpose(1, 2).reshape(b, s, n * d)
    if layout == "BSND":
        return x.transpose(1, 2).contiguous()
    return x.contiguous()


def starts_from_ends(ends: torch.Tensor) -> torch.Tensor:
    """Cumulative ends without a leading 0 (TND's actual_seq_lengths) -> starts."""
    return torch.cat([ends.new_zeros(1), ends[:-1]])


def take(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Per-batch gather along `dim`: out[b, ..., w, ...] = x[b, ..., index[b, w], ...].

    x: batch at dim 0 (size B or 1); index: (B, W) int64, already inside [0, x.shape[dim])."""
    dim = dim % x.dim()
    b, w = index.shape
    shape = list(x.shape)
    shape[0] = b
    x = x.expand(shape)
    view = [b] + [1] * (x.dim() - 1)
    view[dim] = w
    shape[dim] = w
    return torch.gather(x, dim, index.view(view).expand(shape))


def window_index(start: torch.Tensor, width: int, size: int) -> torch.Tensor:
    """(B, width) int64: start[b] + i, clamped into [0, size) (entries past the data are masked
    by the lengths later, so clamping only keeps gathers in range)."""
    i = torch.arange(width, device=start.device)
    return (start.to(torch.int64).view(-1, 1) + i).clamp(0, max(size - 1, 0))


def tnd_to_padded(x: torch.Tensor, ends: torch.Tensor, width: int) -> torch.Tensor:
    """(T, N, D) varlen with cumulative `ends` (B,) -> (B, N, width, D) padded (pad rows are copies
    of a valid row; the lengths mask them)."""
    starts = starts_from_ends(ends)
    idx = window_index(starts, width, x.shape[0])  # (B, W)
    return x[idx].permute(0, 2, 1, 3)  # (B, W, N, D) -> (B, N, W, D)


def padded_to_tnd(x: torch.Tensor, ends: torch.Tensor, total: int) -> torch.Tensor:
    """(B, N, W, ...) padded -> (total, N, ...) varlen; tokens past ends[-1] are zero."""
    t = torch.arange(total, device=x.device)
    ends = ends.to(torch.int64)
    batch = torch.searchsorted(ends, t, right=True)  # sequence of token t
    valid = batch < ends.numel()
    batch = batch.clamp(max=ends.numel() - 1)
    pos = (t - starts_from_ends(ends)[batch]).clamp(0, x.shape[2] - 1)
    out = x[batch, :, pos]  # (total, N, ...)
    return torch.where(valid.view(-1, *([1] * (out.dim() - 1))), out, torch.zeros_like(out))


def scatter_rows(x: torch.Tensor, start: torch.Tensor, lens: torch.Tensor, size: int) -> torch.Tensor:
    """Inverse of take(window_index(start)): (B, N, W, D) logical rows -> (B, N, size, D) physical,
    physical row r of batch b = logical row r - start[b] when inside [0, lens[b]), else zero."""
    r = torch.arange(size, device=x.device).view(1, size)
    rel = r - start.to(torch.int64).view(-1, 1)
    valid = (rel >= 0) & (rel < lens.to(torch.int64).view(-1, 1))
    out = take(x, rel.clamp(0, x.shape[2] - 1), 2)
    return torch.where(valid.view(valid.shape[0], 1, size, 1), out, torch.zeros_like(out))


def gather_paged(cache: torch.Tensor, block_table: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Paged KV -> (B, Nkv, max_blocks*block_size, D).

    cache: (num_blocks, block_size, Nkv*D) (BSH/BSND queries) or (num_blocks, Nkv, block_size, D)
    (BNSD queries); block_table (B, max_blocks) int, every entry a valid block index."""
    b, m = block_table.shape
    blocks = cache.index_select(0, block_table.reshape(-1).to(torch.int64))
    if cache.dim() == 3:
        _, bs, h = cache.shape
        return blocks.view(b, m * bs, kv_heads, h // kv_heads).transpose(1, 2)
    _, nkv, bs, d = cache.shape
    return blocks.view(b, m, nkv, bs, d).permute(0, 2, 1, 3, 4).reshape(b, nkv, m * bs, d)


def decode_quant_param(t: torch.Tensor) -> torch.Tensor:
    """fp32 value of a quant parameter: float tensors as is; uint64/int64 ones are the device's
    packed form (npu_trans_quant_param: the fp32 bits in the low 32 bits)."""
    if t.dtype.is_floating_point:
        return t.to(torch.float32)
    if t.dtype in (torch.int64, torch.uint64):
        low = (t.view(torch.int64) & 0xFFFFFFFF).to(torch.int32)
        return low.view(torch.float32)
    raise ValueError(f"quant parameter dtype {t.dtype} is not supported; pass float32 (or the uint64 "
                     "form of npu_trans_quant_param)")


def per_channel(t: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """A per-tensor (1 element) or per-channel (heads*head_dim elements, laid out as (H,), (N, D),
    (N, 1, D), (1, N, 1, D), (1, 1, N, D) or (1, 1, H)) parameter -> broadcastable to (B, N, S, D)."""
    t = decode_quant_param(t)
    if t.numel() == 1:
        return t.reshape(1, 1, 1, 1)
    return t.reshape(1, heads, 1, head_dim)


def per_token(t: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """A (B, S_kv) / (1, B, S_kv) per-token parameter -> (B, 1, seq, 1), cut or padded (with 1s) to
    seq tokens (positions past the data are masked by the lengths)."""
    t = decode_quant_param(t).reshape(batch, -1)
    if t.shape[1] >= seq:
        t = t[:, :seq]
    else:
        t = torch.cat([t, t.new_ones(batch, seq - t.shape[1])], dim=1)
    return t.view(batch, 1, seq, 1)


def antiquant(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """int8 -> fp32: (x + offset) * scale, scale/offset already broadcastable to x."""
    y = x.to(torch.float32)
    if offset is not None:
        y = y + offset
    return y * scale


def quantize_int8(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """saturate_int8(round_half_even(x * scale + offset)) in fp32."""
    y = x.to(torch.float32) * scale
    if offset is not None:
        y = y + offset
    return torch.round(y).clamp(-128, 127).to(torch.int8)
