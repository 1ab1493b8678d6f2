"""`graphgen::attention`: the canonical attention node that capture emits and passes lower.

It carries everything the model meant (decision 1 of DESIGN.md): scale, causal, sliding window,
softcap, sinks, layer index and kv heads. Its kernel is the exact reference, so a captured graph
runs as is and is the fp32 baseline every pass is tested against.
"""
from __future__ import annotations

import torch

from ._core import attend, visibility
from ._registry import define

SCHEMA = (
    "(Tensor query, Tensor key, Tensor value, *, int layer_idx, float scale, bool causal=True, "
    "int sliding_window=0, float softcap=0., Tensor? sinks=None, int num_key_value_heads=0) -> Tensor"
)
define("attention", SCHEMA, npu=False)


def _check(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_key_value_heads: int) -> None:
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(
            "graphgen::attention takes query (B, N, S, D) and key/value (B, Nkv, S_kv, D); got ranks "
            f"{query.dim()}, {key.dim()}, {value.dim()}"
        )
    nkv = key.shape[1]
    if num_key_value_heads and num_key_value_heads != nkv:
        raise ValueError(f"num_key_value_heads={num_key_value_heads} but key has {nkv} heads (dim 1)")


@torch.library.impl("graphgen::attention", "CompositeExplicitAutograd")
def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    layer_idx: int,
    scale: float,
    causal: bool = True,
    sliding_window: int = 0,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    num_key_value_heads: int = 0,
) -> torch.Tensor:
    """query (B, N, Sq, D), key/value (B, Nkv, Skv, D) -> out (B, Sq, N, D) in query's dtype.

    Causal is aligned bottom-right (query i is position Skv - Sq + i); sliding_window w > 0 lets a
    query see only the last w positions including itself (transformers' `kv_idx > q_idx - w`).
    """
    _check(query, key, value, num_key_value_heads)
    b, _, sq, _ = query.shape
    skv = key.shape[2]
    q_lens = torch.full((b,), sq, dtype=torch.int64, device=query.device)
    kv_lens = torch.full((b,), skv, dtype=torch.int64, device=query.device)
    vis = visibility(
        sq,
        skv,
        q_lens=q_lens,
        kv_lens=kv_lens,
        causal="bottom_right" if causal else None,
        pre_tokens=sliding_window - 1 if sliding_window > 0 else 2147483647,
        band="bottom_right" if sliding_window > 0 else None,
    )
    res = attend(query, key, value, scale=scale, visible=vis, sink=sinks, softcap=softcap)
    return res.out.transpose(1, 2).to(query.dtype).contiguous()


@torch.library.register_fake("graphgen::attention")
def _attention_fake(query, key, value, *, layer_idx, scale, causal=True, sliding_window=0, softcap=0.0,
                    sinks=None, num_key_value_heads=0):
    b, n, sq, d = query.shape
    return query.new_empty((b, sq, n, value.shape[-1]))
