"""The math every attention op shares: masked softmax attention in BNSD with GQA, fp32 accumulation.

Each op (IFA, PFA, FIA, the training op) turns its layouts, lengths, masks and cache forms into
these two calls: `visibility(...)` builds which keys each query may see, `attend(...)` computes
`softmax(scale * Q.K^T + bias) . V` over the visible keys. Nothing here knows an op's argument
names; that keeps the semantics in one place and the op files about layouts and checks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

UNBOUNDED = 2147483647
# Some torch_npu releases ship PFA with this default (a typo upstream); it means "unbounded" too.
UNBOUNDED_TYPO = 2147473647


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 accumulation for fp32/fp16/bf16 (and int8 after dequant); fp64 stays fp64 (gradcheck)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@dataclass
class AttentionResult:
    """out: (B, N, Sq, Dv) in the compute dtype; row_max / row_sum / lse: (B, N, Sq) in the compute
    dtype. row_max is the max of the visible logits, row_sum = sum exp(logit - row_max) (plus the
    sink term when a sink is given), lse = row_max + log(row_sum). Rows with nothing visible have
    out = 0, row_max = -inf, row_sum = 0 (or the sink term), lse = -inf (or the sink logit)."""

    out: torch.Tensor
    row_max: torch.Tensor
    row_sum: torch.Tensor
    lse: torch.Tensor


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    visible: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    sink: torch.Tensor | None = None,
    softcap: float = 0.0,
    dropout_keep: torch.Tensor | None = None,
    keep_prob: float = 1.0,
    quantize_probs: float | None = None,
) -> AttentionResult:
    """Masked attention, vectorized over batch and heads.

    q: (B, N, Sq, D); k: (B, Nkv, Skv, D), v: (B, Nkv, Skv, Dv) with N % Nkv == 0 (query head h reads KV head
    h // (N // Nkv); KV is never repeated in memory). visible: bool, broadcastable to
    (B, N, Sq, Skv), True where the key may be attended (None: all). bias: added to the *scaled*
    logits, broadcastable to (B, N, Sq, Skv). sink: (N,) extra per-head logit, not scaled, that
    only enlarges the softmax denominator. softcap > 0: logits become softcap * tanh(logits / softcap)
    (after scale, before bias and mask; Gemma-2 style). dropout_keep: bool (B, N, Sq, Skv); kept
    probabilities are divided by keep_prob. quantize_probs: the int8 path's quant_scale1: the
    normalized probabilities become saturate_int8(round_half_even(P * quantize_probs)) before P.V
    (the caller rescales the result by its dequant_scale2).
    """
    b, n, sq, d = q.shape
    nkv, skv = k.shape[1], k.shape[2]
    if n % nkv:
        raise ValueError(f"num_heads ({n}) must be a multiple of num_key_value_heads ({nkv})")
    g = n // nkv
    ct = compute_dtype(q)
    qg = q.to(ct).reshape(b, nkv, g, sq, d)
    kg = k.to(ct).unsqueeze(2)  # (B, Nkv, 1, Skv, D)
    vg = v.to(ct).unsqueeze(2)
    logits = torch.matmul(qg, kg.transpose(-1, -2)) * scale  # (B, Nkv, G, Sq, Skv)
    logits = logits.reshape(b, n, sq, skv)
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    if bias is not None:
        logits = logits + bias.to(ct)
    if visible is not None:
        visible = visible.expand(b, n, sq, skv)
        logits = logits.masked_fill(~visible, float("-inf"))

    row_max = logits.amax(dim=-1)  # -inf for rows with nothing visible
    stable_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    if sink is not None:
        sink_logit = sink.to(ct).view(1, n, 1).expand(b, n, sq)
        stable_max = torch.maximum(stable_max, sink_logit)
    probs = torch.exp(logits - stable_max.unsqueeze(-1))  # exp(-inf) = 0 for masked keys
    denom = probs.sum(dim=-1)
    if sink is not None:
        denom = denom + torch.exp(sink_logit - stable_max)
    safe_denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    probs = probs / safe_denom.unsqueeze(-1)
    if dropout_keep is not None:
        probs = probs * dropout_keep.to(ct) / keep_prob
    if quantize_probs is not None:
        probs = torch.round(probs * quantize_probs).clamp(-128, 127)
    out = torch.matmul(probs.reshape(b, nkv, g, sq, skv), vg).reshape(b, n, sq, v.shape[-1])

    # Report the statistics relative to the true row max (not the sink-adjusted one).
    row_sum = denom * torch.exp(stable_max - torch.where(torch.isfinite(row_max), row_max, stable_max))
    lse = torch.where(denom > 0, stable_max + torch.log(safe_denom), torch.full_like(denom, float("-inf")))
    return AttentionResult(out=out, row_max=row_max, row_sum=row_sum, lse=lse)


def visibility(
    sq: int,
    skv: int,
    *,
    q_lens: torch.Tensor,
    kv_lens: torch.Tensor,
    causal: str | None = None,
    pre_tokens: int = UNBOUNDED,
    next_tokens: int = UNBOUNDED,
    band: str | None = None,
    prefix: torch.Tensor | None = None,
    masked: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which keys each query may see, as bool (B, 1, Sq, Skv) (or (B, N, Sq, Skv) when `masked` has
    a head dim).

    q_lens / kv_lens: int tensors (B,), the valid lengths inside the padded Sq / Skv; queries and
    keys beyond them see / are seen by nothing. causal: None, "top_left" (j <= i) or
    "bottom_right" (j <= i + kv_len - q_len). band: None, "top_left" (-pre <= j - i <= next) or
    "bottom_right" (the same with j shifted by kv_len - q_len). prefix: (B,) the first prefix[b]
    keys are visible to every valid row (added after causal/band). masked: bool, broadcastable
    to (B, N, Sq, Skv), True = masked out (the NPU convention).
    """
    device = q_lens.device
    i = torch.arange(sq, device=device).view(1, sq, 1)
    j = torch.arange(skv, device=device).view(1, 1, skv)
    ql = q_lens.to(torch.int64).view(-1, 1, 1)
    kl = kv_lens.to(torch.int64).view(-1, 1, 1)
    shift = kl - ql  # bottom-right alignment offset per batch
    vis = (i < ql) & (j < kl)
    if causal == "top_left":
        vis = vis & (j <= i)
    elif causal == "bottom_right":
        vis = vis & (j <= i + shift)
    elif causal is not None:
        raise ValueError(f"causal must be None, 'top_left' or 'bottom_right', got {causal!r}")
    pre = UNBOUNDED if pre_tokens in (UNBOUNDED, UNBOUNDED_TYPO) else pre_tokens
    nxt = UNBOUNDED if next_tokens in (UNBOUNDED, UNBOUNDED_TYPO) else next_tokens
    if band is not None:
        rel = j - i if band == "top_left" else j - i - shift
        vis = vis & (rel >= -pre) & (rel <= nxt)
    if prefix is not None:
        px = prefix.to(torch.int64).view(-1, 1, 1)
        vis = vis | ((j < px) & (j < kl) & (i < ql))
    vis = vis.unsqueeze(1)  # (B, 1, Sq, Skv)
    if masked is not None:
        vis = vis & ~masked.to(torch.bool)
    return vis
