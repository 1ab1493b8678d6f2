"""An independent, deliberately naive attention: per batch and per head, masks built element by
element from first principles, float64 throughout. Tests compare every graphgen op with it; it
shares no code with graphgen.ops."""
from __future__ import annotations

import math
from typing import Callable

import torch

# allowed(b, h, i, j) -> bool: may query i of head h in batch b see key j?
Allowed = Callable[[int, int, int, int], bool]


def explicit_mask(b: int, n: int, sq: int, skv: int, allowed: Allowed) -> torch.Tensor:
    """bool (B, N, Sq, Skv), True where `allowed` says the key is visible."""
    return torch.tensor(
        [[[[bool(allowed(bi, h, i, j)) for j in range(skv)] for i in range(sq)] for h in range(n)] for bi in range(b)],
        dtype=torch.bool,
    ).reshape(b, n, sq, skv)


def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    allowed: Allowed | torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    sink: torch.Tensor | None = None,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, N, Sq, D), k/v (B, Nkv, Skv, D). bias is added to the scaled logits, broadcastable to
    (B, N, Sq, Skv). Returns out (B, N, Sq, D) and lse (B, N, Sq), float64; rows with nothing
    visible give out = 0 and lse = -inf (or the sink logit)."""
    b, n, sq, d = q.shape
    nkv, skv = k.shape[1], k.shape[2]
    group = n // nkv
    if allowed is None:
        mask = torch.ones(b, n, sq, skv, dtype=torch.bool)
    elif callable(allowed):
        mask = explicit_mask(b, n, sq, skv, allowed)
    else:
        mask = allowed.expand(b, n, sq, skv)
    out = torch.zeros(b, n, sq, v.shape[-1], dtype=torch.float64)
    lse = torch.full((b, n, sq), -math.inf, dtype=torch.float64)
    for bi in range(b):
        for h in range(n):
            kh = h // group
            s = q[bi, h].double() @ k[bi, kh].double().T * scale
            if softcap > 0:
                s = softcap * torch.tanh(s / softcap)
            if bias is not None:
                s = s + bias.double().expand(b, n, sq, skv)[bi, h]
            s = s.masked_fill(~mask[bi, h], -math.inf)
            if sink is not None:
                s = torch.cat([s, sink.double()[h].expand(sq, 1)], dim=1)
            row_lse = torch.logsumexp(s, dim=1)
            p = torch.exp(s - row_lse[:, None]).nan_to_num(0.0)
            if sink is not None:
                p = p[:, :-1]
            out[bi, h] = p @ v[bi, kh].double()
            lse[bi, h] = row_lse
    return out, lse


def npu_sparse_allowed(
    sparse_mode: int,
    sq: int,
    skv: int,
    *,
    mask: torch.Tensor | None = None,
    pre: int = 2147483647,
    nxt: int = 2147483647,
    prefix: int = 0,
    split_here: bool = False,
) -> Callable[[int, int], bool]:
    """allowed(i, j) for one sequence of the training op (npu_fusion_attention), from the upstream
    description of each sparse_mode. mask: the full (Sq, Skv) bool mask (True = masked) for modes
    0/1; no mask means no masking in any mode. split_here: for 7/8, this sequence is the one whose
    query was split (a band aligned bottom-right); otherwise 7 acts as 3 and 8 as 2."""
    shift = skv - sq
    if mask is None:
        return lambda i, j: True
    if sparse_mode == 0:
        return lambda i, j: (not bool(mask[i, j])) and -pre <= j - i <= nxt
    if sparse_mode == 1:
        return lambda i, j: not bool(mask[i, j])
    if sparse_mode == 2 or (sparse_mode == 8 and not split_here):
        return lambda i, j: j <= i
    if sparse_mode == 3 or (sparse_mode == 7 and not split_here):
        return lambda i, j: j <= i + shift
    if sparse_mode in (4, 7, 8):
        return lambda i, j: -pre <= j - i - shift <= nxt
    if sparse_mode in (5, 6):
        return lambda i, j: j <= i + shift or j < prefix
    raise ValueError(sparse_mode)


def naive_dropout_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    allowed: Callable[[int, int, int, int], bool] | None = None,
    pse: torch.Tensor | None = None,
    sink: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    keep_prob: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training op's math, per batch and head, differentiable (autograd) and float64:
    softmax(scale * (pse + q.k^T) masked, with the sink in the denominator), dropout by `keep`
    (bool (B, N, Sq, Skv)) scaled by 1/keep_prob, times v. q (B, N, Sq, D), k (B, Nkv, Skv, D),
    v (B, Nkv, Skv, Dv). Returns out (B, N, Sq, Dv), row max and row sum (B, N, Sq); rows with
    nothing visible give zeros (and max -inf)."""
    b, n, sq, _ = q.shape
    nkv, skv = k.shape[1], k.shape[2]
    group = n // nkv
    outs, maxes, sums = [], [], []
    for bi in range(b):
        for h in range(n):
            kh = h // group
            s = (q[bi, h].double() @ k[bi, kh].double().T)
            if pse is not None:
                s = s + pse.double().expand(b, n, sq, skv)[bi, h]
            s = s * scale
            if allowed is not None:
                vis = torch.tensor([[bool(allowed(bi, h, i, j)) for j in range(skv)] for i in range(sq)],
                                   dtype=torch.bool).reshape(sq, skv)
                s = s.masked_fill(~vis, -math.inf)
            row_max = s.max(dim=1).values
            m = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
            if sink is not None:
                m = torch.maximum(m, sink.double()[h].expand(sq))
            e = torch.exp(s - m[:, None])
            den = e.sum(dim=1)
            if sink is not None:
                den = den + torch.exp(sink.double()[h] - m)
            p = e / torch.where(den > 0, den, torch.ones_like(den))[:, None]
            if keep is not None:
                p = p * keep[bi, h].double() / keep_prob
            outs.append(p @ v[bi, kh].double())
            maxes.append(row_max)
            sums.append(den * torch.exp(m - torch.where(torch.isfinite(row_max), row_max, m)))
    out = torch.stack(outs).reshape(b, n, sq, v.shape[-1])
    return out, torch.stack(maxes).reshape(b, n, sq), torch.stack(sums).reshape(b, n, sq)


# --- inference ops (IFA / PFA / FIA): visibility written out from npu-ops.md section 2 -----------

_UNBOUNDED = (2147483647, 2147473647)


def inference_allowed(
    q_lens: list[int],
    kv_lens: list[int],
    *,
    sparse_mode: int = 0,
    pre_tokens: int = 2147483647,
    next_tokens: int = 2147483647,
    mask: Callable[[int, int, int, int], bool] | None = None,
    band_with_mask: bool = True,
) -> Allowed:
    """allowed(b, h, i, j) for the inference ops: rows/keys beyond the per-batch lengths are
    invisible; sparse_mode 0 = mask plus the top-left pre/next band (no mask: everything visible;
    band_with_mask=False for IFA, which has no band), 1 = mask only, 2 = j <= i,
    3 = j <= i + (kv_len - q_len), 4 = -pre <= j - i - (kv_len - q_len) <= next.
    `mask(b, h, i, j)` is True where masked out."""

    def within(rel: int) -> bool:
        lo = rel >= -pre_tokens if pre_tokens not in _UNBOUNDED else True
        hi = rel <= next_tokens if next_tokens not in _UNBOUNDED else True
        return lo and hi

    def allowed(b: int, h: int, i: int, j: int) -> bool:
        if i >= q_lens[b] or j >= kv_lens[b]:
            return False
        shift = kv_lens[b] - q_lens[b]
        if sparse_mode == 0:
            if mask is None:
                return True
            return not mask(b, h, i, j) and (within(j - i) or not band_with_mask)
        if sparse_mode == 1:
            return not mask(b, h, i, j)
        if sparse_mode == 2:
            return j <= i
        if sparse_mode == 3:
            return j <= i + shift
        if sparse_mode == 4:
            return within(j - i - shift)
        raise ValueError(sparse_mode)

    return allowed


def zero_rows(out: torch.Tensor, q_lens: list[int]) -> torch.Tensor:
    """out (B, N, Sq, D): rows beyond q_lens[b] set to 0 (the ops' convention for padded rows)."""
    out = out.clone()
    for b, n in enumerate(q_lens):
        out[b, :, n:] = 0
    return out


def to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """(B, N, S, D) -> BSH (B, S, N*D), BSND (B, S, N, D) or BNSD (as is)."""
    if layout == "BNSD":
        return x.contiguous()
    bsnd = x.permute(0, 2, 1, 3).contiguous()
    return bsnd if layout == "BSND" else bsnd.reshape(x.shape[0], x.shape[2], -1)


def pack_tnd(x: torch.Tensor, lens: list[int]) -> torch.Tensor:
    """(B, N, S, D) padded -> (sum(lens), N, D): the first lens[b] tokens of each sequence."""
    return torch.cat([x[b, :, : lens[b]].permute(1, 0, 2) for b in range(x.shape[0])], dim=0)


def page_kv(x: torch.Tensor, block_size: int, bnsd_cache: bool, gen: torch.Generator,
            spare_blocks: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Nkv, S, D) -> (cache, block_table): each sequence's tokens copied block by block into
    randomly chosen blocks of a cache (num_blocks, block_size, Nkv*D) or (num_blocks, Nkv,
    block_size, D); block_table int32 (B, ceil(S/bs) + 1), the extra column holding -1 (unused)."""
    b, nkv, s, d = x.shape
    per_seq = -(-s // block_size)
    num_blocks = b * per_seq + spare_blocks
    order = torch.randperm(num_blocks, generator=gen)
    if bnsd_cache:
        cache = torch.randn(num_blocks, nkv, block_size, d, generator=gen).to(x.dtype)
    else:
        cache = torch.randn(num_blocks, block_size, nkv * d, generator=gen).to(x.dtype)
    table = torch.full((b, per_seq + 1), -1, dtype=torch.int32)
    for bi in range(b):
        for m in range(per_seq):
            blk = int(order[bi * per_seq + m])
            table[bi, m] = blk
            for t in range(block_size):
                pos = m * block_size + t
                if pos >= s:
                    break
                if bnsd_cache:
                    cache[blk, :, t] = x[bi, :, pos]
                else:
                    cache[blk, t] = x[bi, :, pos].reshape(-1)
    return cache, table
