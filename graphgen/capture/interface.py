"""Route every HF attention call to `torch.ops.graphgen.attention`, and build no masks.

transformers' modeling code calls `ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module,
query, key, value, attention_mask, scaling=, dropout=, sliding_window=, softcap=, s_aux=, ...)`
and asks `ALL_MASK_ATTENTION_FUNCTIONS[...]` for the mask. Registering "graphgen" in both turns
each attention layer into exactly one canonical node whose attributes say what the mask meant.
Only what the model passes is used (no model_type special cases): e.g. Gemma-3 keeps
attn_logit_softcapping in its config but never passes `softcap`, so its eager path has none either.
It is for capture: current tokens only (use_cache=False), no padding; anything else is refused.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
from transformers.utils.import_utils import is_tracing

import graphgen.ops  # noqa: F401  (defines torch.ops.graphgen.attention)

NAME = "graphgen"

# kwargs the modeling code passes that carry no attention semantics for a no-cache, no-padding capture.
_IGNORED = {"position_ids", "output_attentions", "use_cache", "cache_position", "cu_seq_lens_q", "cu_seq_lens_k",
            "max_length_q", "max_length_k", "token_type_ids", "layer_type", "output_router_logits",
            "output_hidden_states", "return_dict"}


class UnsupportedAttention(ValueError):
    """The model asked for attention the canonical node cannot express; names the layer and why."""


def graphgen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query (B, N, S, D), key/value (B, Nkv, S, D) -> (out (B, S, N, D), None), like sdpa_attention_forward."""
    layer_idx = getattr(module, "layer_idx", None)
    where = f"{type(module).__name__} (layer {layer_idx})"
    if layer_idx is None:
        raise UnsupportedAttention(f"{where}: the attention module has no layer_idx; graphgen needs it to name the KV cache")
    if attention_mask is not None:
        raise UnsupportedAttention(
            f"{where}: got a materialized attention mask {tuple(attention_mask.shape)}; graphgen captures without "
            "padding masks (padding is the paged graphs' sequence lengths). Call the model without attention_mask."
        )
    if dropout:
        raise UnsupportedAttention(f"{where}: attention dropout {dropout}; put the model in eval mode")
    extra = {k: v for k, v in kwargs.items() if k not in _IGNORED and v is not None}
    if extra:
        raise UnsupportedAttention(f"{where}: attention kwargs {sorted(extra)} have no graphgen meaning yet")
    if key.shape[2] != query.shape[2]:
        raise UnsupportedAttention(f"{where}: {key.shape[2]} keys for {query.shape[2]} queries; capture with use_cache=False")
    sink = s_aux if s_aux is not None else sinks
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    out = torch.ops.graphgen.attention(
        query,
        key,
        value,
        layer_idx=int(layer_idx),
        scale=float(scaling if scaling is not None else query.shape[-1] ** -0.5),
        causal=bool(causal),
        sliding_window=int(sliding_window or 0),
        softcap=float(softcap or 0.0),
        sinks=sink,
        num_key_value_heads=int(key.shape[1]),
    )
    return out, None


def no_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> None:
    """The mask function for "graphgen": causality and windows are node attributes, so no mask is built.
    A padding mask cannot be expressed that way, so it is refused rather than dropped (an all-ones
    mask, as tokenizers return, is fine when it can be checked, i.e. outside tracing)."""
    if attention_mask is not None and not (not is_tracing(attention_mask) and bool(attention_mask.all())):
        raise UnsupportedAttention(
            "a 2D padding attention_mask was passed; graphgen captures without padding (the paged graphs take "
            "sequence lengths instead). Call the model without attention_mask."
        )
    return None


def register() -> str:
    """Register (idempotently) and return the attn_implementation name, "graphgen"."""
    AttentionInterface.register(NAME, graphgen_attention)
    AttentionMaskInterface.register(NAME, no_mask)
    return NAME


register()
