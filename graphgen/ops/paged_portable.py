"""Portable paged attention for layers the NPU ops cannot express (logit softcap, attention sinks).

Two graph-only ops (cpu/cuda; `npu=False`, nothing to mirror as torch.ops.npu.*), with the same
meaning as the canonical `graphgen::attention` node but reading the paged KV pool:

  varlen_attention(query (T, N, D), key/value (T, Nkv, D), cu_seq_lens (K,)) -> (T, N, Dv)
      the packed prefill: tokens of K sequences in one row, `cu_seq_lens` their cumulative ends
      (no leading 0, TND's convention); a token sees the earlier tokens of its own sequence.
  paged_attention(query (B, N, Sq, D), key_cache, value_cache, block_table (B, M), seq_lens (B,))
      -> (B, Sq, N, Dv): query i of row b sits at position seq_lens[b] - Sq + i (bottom-right
      causal) and reads positions < seq_lens[b] through `block_table`. Pools are (num_blocks,
      block_size, Nkv*D) (BSH) or (num_blocks, Nkv, block_size, D) (BNSD), told apart by rank.

Both take sliding_window (w > 0: see the last w positions including itself), softcap (> 0:
softcap * tanh(logits / softcap)) and sinks ((N,) per-head logits that only enlarge the softmax
denominator). The math is `_core.visibility` + `_core.attend`, the one implementation every op uses.
"""
from __future__ import annotations

import torch

from ._checks import fail
from ._core import UNBOUNDED, attend, visibility
from ._layouts import gather_paged
from ._registry import define

_OPTIONS = "float scale, int sliding_window=0, float softcap=0., Tensor? sinks=None"
VARLEN = "varlen_attention"
PAGED = "paged_attention"
define(VARLEN, f"(Tensor query, Tensor key, Tensor value, Tensor cu_seq_lens, *, {_OPTIONS}) -> Tensor", npu=False)
define(PAGED, "(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_table, Tensor seq_lens, *, "
       f"int num_key_value_heads, {_OPTIONS}) -> Tensor", npu=False)


def _check_common(op: str, n: int, nkv: int, sinks: torch.Tensor | None, sliding_window: int, softcap: float) -> None:
    if nkv < 1 or n % nkv:
        fail(op, "query", f"has {n} heads, not a multiple of the {nkv} key/value heads",
             "pass key/value (or num_key_value_heads) with a head count dividing the query's")
    if sinks is not None and tuple(sinks.shape) != (n,):
        fail(op, "sinks", f"has shape {tuple(sinks.shape)}", f"pass one logit per query head, shape ({n},)")
    if sliding_window < 0:
        fail(op, "sliding_window", f"is {sliding_window}", "pass 0 (full attention) or a window > 0")
    if softcap < 0:
        fail(op, "softcap", f"is {softcap}", "pass 0 (none) or a cap > 0")


def _band(sliding_window: int) -> dict:
    if sliding_window > 0:
        return {"pre_tokens": sliding_window - 1, "next_tokens": 0}
    return {"pre_tokens": UNBOUNDED, "next_tokens": UNBOUNDED}


@torch.library.impl(f"graphgen::{VARLEN}", "CompositeExplicitAutograd")
def varlen_attention(query, key, value, cu_seq_lens, *, scale, sliding_window=0, softcap=0.0, sinks=None):
    """query (T, N, D), key/value (T, Nkv, D), cu_seq_lens (K,) int -> (T, N, Dv) in query's dtype."""
    if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
        fail(VARLEN, "query/key/value", f"have ranks {query.dim()}, {key.dim()}, {value.dim()}",
             "pass packed (total_tokens, heads, head_dim) tensors (TND)")
    t, n, _ = query.shape
    _check_common(VARLEN, n, key.shape[1], sinks, sliding_window, softcap)
    pos = torch.arange(t, device=query.device)
    segment = torch.searchsorted(cu_seq_lens.to(torch.int64), pos, right=True)  # sequence of each token
    other = segment.view(1, 1, t, 1) != segment.view(1, 1, 1, t)
    full = torch.full((1,), t, dtype=torch.int64, device=query.device)
    vis = visibility(t, t, q_lens=full, kv_lens=full, causal="top_left", band="top_left", masked=other,
                     **_band(sliding_window))
    res = attend(query.transpose(0, 1)[None], key.transpose(0, 1)[None], value.transpose(0, 1)[None],
                 scale=scale, visible=vis, sink=sinks, softcap=softcap)
    return res.out[0].transpose(0, 1).to(query.dtype).contiguous()


@torch.library.register_fake(f"graphgen::{VARLEN}")
def _varlen_fake(query, key, value, cu_seq_lens, *, scale, sliding_window=0, softcap=0.0, sinks=None):
    return query.new_empty((query.shape[0], query.shape[1], value.shape[-1]))


@torch.library.impl(f"graphgen::{PAGED}", "CompositeExplicitAutograd")
def paged_attention(query, key_cache, value_cache, block_table, seq_lens, *, num_key_value_heads, scale,
                    sliding_window=0, softcap=0.0, sinks=None):
    """query (B, N, Sq, D) over the pools through block_table (B, M) -> (B, Sq, N, Dv)."""
    if query.dim() != 4:
        fail(PAGED, "query", f"has {query.dim()} dims {tuple(query.shape)}", "pass (batch, heads, seq, head_dim)")
    if key_cache.dim() not in (3, 4) or key_cache.dim() != value_cache.dim():
        fail(PAGED, "key_cache/value_cache", f"have ranks {key_cache.dim()}, {value_cache.dim()}",
             "pass pools (num_blocks, block_size, Nkv*D) (BSH) or (num_blocks, Nkv, block_size, D) (BNSD)")
    b, n, sq, _ = query.shape
    _check_common(PAGED, n, num_key_value_heads, sinks, sliding_window, softcap)
    k = gather_paged(key_cache, block_table, num_key_value_heads)  # (B, Nkv, M*block_size, D)
    v = gather_paged(value_cache, block_table, num_key_value_heads)
    q_lens = torch.full((b,), sq, dtype=torch.int64, device=query.device)
    vis = visibility(sq, k.shape[2], q_lens=q_lens, kv_lens=seq_lens, causal="bottom_right", band="bottom_right",
                     **_band(sliding_window))
    res = attend(query, k, v, scale=scale, visible=vis, sink=sinks, softcap=softcap)
    return res.out.transpose(1, 2).to(query.dtype).contiguous()


@torch.library.register_fake(f"graphgen::{PAGED}")
def _paged_fake(query, key_cache, value_cache, block_table, seq_lens, *, num_key_value_heads, scale,
                sliding_window=0, softcap=0.0, sinks=None):
    b, n, sq, d = query.shape
    dv = value_cache.shape[-1] // num_key_value_heads if value_cache.dim() == 3 else value_cache.shape[-1]
    return query.new_empty((b, sq, n, dv))
