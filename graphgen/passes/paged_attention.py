"""Paged attention: canonical `graphgen::attention` nodes -> KV-cache write + NPU attention op.

Per phase (DESIGN.md decision 4):
- prefill: the new tokens of several sequences packed into one row (TND varlen). Each layer writes
  its new K/V into the pools at `slot_mapping`, then runs `npu_prompt_flash_attention` over the new
  tokens with cumulative `cu_seq_lens`, sparse_mode 3 (bottom-right causal) and the compressed
  2048x2048 mask; a sliding window becomes the band of sparse_mode 4 (pre_tokens = window - 1,
  next_tokens = 0).
- extend: one sequence whose prefix is already in the pool (prefix-cache hit): write the new
  tokens' K/V, then `npu_fused_infer_attention_score` (Q_S > 1) over the pool via `block_table`.
- mixed (cpu/cuda): several sequences' new tokens packed into one row (TND), each sequence over
  its prefix in the pool: chunked prefill beside decode rows (one token each), prefix-cache hits.
  Write the new K/V, then `npu_fused_infer_attention_score` in TND with `block_table`, cumulative
  query ends `cu_seq_lens` and per-sequence KV lengths `seq_lens` (the form vLLM-Ascend runs
  chunked prefill in), sparse_mode 3 (sparse_mode 4 for a window). A BNSD pool is no TND cache,
  so there each token becomes one row of `npu_incre_flash_attention` (`token_rows`).
- decode: one new token per sequence. Each layer writes the token's K/V at `slot_mapping`, then
  runs `npu_incre_flash_attention` over the pool with `block_table`, `seq_lens` (KV lengths
  including the new token), `block_size` and `num_key_value_heads`; a sliding window becomes an
  `atten_mask` over the pool positions.

Layers the NPU ops cannot express (a logit softcap, attention sinks) take the portable path in
every phase: the same KV writes, then `graphgen::varlen_attention` (prefill) or
`graphgen::paged_attention` (extend, decode; graphgen/ops/paged_portable.py) with the node's softcap,
sinks and window. Those graphs run on cpu/cuda; the lint reports them as not NPU-expressible.

The pools, block tables, lengths, slot mappings and positions become explicit graph inputs
(decision 2); only KV heads live in the pools (no repeat_kv). A head_dim that is not a multiple of
16 is zero-padded, which is exact: padded query/key columns add 0 to Q.K^T and padded value
columns are sliced off. Lengths are tensors here (the `.tensor_lengths` overloads); the NPU
lowering turns them into the int lists torch_npu's schemas take.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..ops.paged_decode import token_rows
from ..spec import PHASE_INPUTS, KVSpec, cache_input_names

ATTENTION = torch.ops.graphgen.attention.default
COMPRESSED_MASK_SIZE = 2048
HEAD_DIM_ALIGN = 16


@dataclass
class PassRecord:
    """What a pass did: `matched` nodes rewritten, `skipped` with reasons, free-form `notes`."""

    name: str
    matched: int = 0
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def compressed_causal_mask(device: torch.device | str = "cpu") -> torch.Tensor:
    """The (2048, 2048) mask sparse modes 2/3/4 take: True (masked) above the diagonal."""
    return torch.ones(COMPRESSED_MASK_SIZE, COMPRESSED_MASK_SIZE, dtype=torch.bool, device=device).triu(1)


def padded_head_dim(head_dim: int) -> int:
    return math.ceil(head_dim / HEAD_DIM_ALIGN) * HEAD_DIM_ALIGN


def _pad_last(x: torch.Tensor, size: int) -> torch.Tensor:
    return x if x.shape[-1] == size else F.pad(x, (0, size - x.shape[-1]))


def causal_mode(sliding_window: int) -> dict:
    """PFA/FIA's masking for a causal layer: sparse_mode 3 (bottom-right causal), or with a window
    sparse_mode 4's band (pre_tokens = window - 1, next_tokens = 0)."""
    band = sliding_window > 0
    return {"pre_tokens": sliding_window - 1 if band else 2147483647, "next_tokens": 0, "sparse_mode": 4 if band else 3}


def write_kv(cache: torch.Tensor, slot_mapping: torch.Tensor, kv: torch.Tensor, *, layout: str, block_size: int) -> None:
    """Scatter kv (tokens, Nkv, D) into the pool at flat slots (block * block_size + offset).
    Padded tokens carry slots in the reserved scratch block, so every index is in range."""
    kv = kv.to(cache.dtype)
    if layout == "BSH":
        cache.view(-1, cache.shape[-1]).index_copy_(0, slot_mapping, kv.flatten(1))
    else:
        blocks = torch.div(slot_mapping, block_size, rounding_mode="floor")
        offsets = slot_mapping - blocks * block_size
        heads = torch.arange(kv.shape[1], device=kv.device)
        cache.index_put_((blocks[:, None], heads[None, :], offsets[:, None]), kv)


def write_new_tokens(key, value, key_cache, value_cache, slot_mapping, *, head_dim: int, layout: str, block_size: int):
    """Write the new tokens' K/V, key/value (B, Nkv, S, Dm), into the pools at `slot_mapping`
    (B*S slots, batch-major). Returns them as (B*S, Nkv, D), zero-padded to the stored head_dim."""
    k = _pad_last(key.transpose(1, 2).flatten(0, 1), head_dim)
    v = _pad_last(value.transpose(1, 2).flatten(0, 1), head_dim)
    write_kv(key_cache, slot_mapping, k, layout=layout, block_size=block_size)
    write_kv(value_cache, slot_mapping, v, layout=layout, block_size=block_size)
    return k, v


def prefill_attention(
    query, key, value, key_cache, value_cache, slot_mapping, cu_seq_lens, mask, *, layout: str, block_size: int,
    head_dim: int, scale: float, sliding_window: int,
):
    """query (1, N, T, Dm), key/value (1, Nkv, T, Dm) of the packed new tokens -> (1, T, N, Dm)."""
    n, nkv, dm, d = query.shape[1], key.shape[1], query.shape[-1], head_dim
    q = _pad_last(query[0].transpose(0, 1), d)  # (T, N, D)
    k, v = write_new_tokens(key, value, key_cache, value_cache, slot_mapping, head_dim=d, layout=layout,
                            block_size=block_size)  # (T, Nkv, D)
    out = torch.ops.graphgen.npu_prompt_flash_attention.tensor_lengths(
        q, k, v,
        atten_mask=mask,
        actual_seq_lengths=cu_seq_lens,
        actual_seq_lengths_kv=cu_seq_lens,
        num_heads=n,
        scale_value=scale,
        input_layout="TND",
        num_key_value_heads=nkv,
        **causal_mode(sliding_window),
    )
    return out[..., :dm].unsqueeze(0)


def decode_attention(
    query, key, value, key_cache, value_cache, slot_mapping, block_table, seq_lens, *, layout: str, block_size: int,
    head_dim: int, scale: float, sliding_window: int,
):
    """query (B, N, 1, Dm), key/value (B, Nkv, 1, Dm) of one new token per sequence -> (B, 1, N, Dm)."""
    b, n, _, dm = query.shape
    nkv, d = key.shape[1], head_dim
    q = _pad_last(query, d)
    write_new_tokens(key, value, key_cache, value_cache, slot_mapping, head_dim=d, layout=layout, block_size=block_size)
    atten_mask = None
    if sliding_window > 0:
        # Pool position j of sequence b is masked unless seq_len - window <= j (IFA has no band).
        pos = torch.arange(block_table.shape[1] * block_size, device=q.device)
        atten_mask = (pos[None, :] < (seq_lens[:, None] - sliding_window)).unsqueeze(1)
    q_in = q.transpose(1, 2).reshape(b, 1, n * d) if layout == "BSH" else q
    out = torch.ops.graphgen.npu_incre_flash_attention.tensor_lengths(
        q_in, key_cache, value_cache,
        atten_mask=atten_mask,
        actual_seq_lengths=seq_lens,
        block_table=block_table,
        num_heads=n,
        scale_value=scale,
        input_layout=layout,
        num_key_value_heads=nkv,
        block_size=block_size,
    )
    out = out.view(b, 1, n, d) if layout == "BSH" else out.transpose(1, 2)
    return out[..., :dm]


def extend_attention(
    query, key, value, key_cache, value_cache, slot_mapping, block_table, seq_lens, mask, *, layout: str,
    block_size: int, head_dim: int, scale: float, sliding_window: int,
):
    """One sequence whose first tokens are already in the pool (a prefix-cache hit): query (1, N, T,
    Dm) of its T new tokens, key/value (1, Nkv, T, Dm) -> (1, T, N, Dm). The new K/V are written,
    then `npu_fused_infer_attention_score` reads the whole sequence through `block_table`, causal
    aligned bottom-right (new token t sees everything up to position seq_len - T + t)."""
    _, n, t, dm = query.shape
    nkv, d = key.shape[1], head_dim
    q = _pad_last(query, d)
    write_new_tokens(key, value, key_cache, value_cache, slot_mapping, head_dim=d, layout=layout, block_size=block_size)
    q_in = q.transpose(1, 2).reshape(1, t, n * d) if layout == "BSH" else q
    out, _ = torch.ops.graphgen.npu_fused_infer_attention_score.tensor_lengths(
        q_in, key_cache, value_cache,
        atten_mask=mask,
        actual_seq_lengths_kv=seq_lens,
        block_table=block_table,
        num_heads=n,
        scale=scale,
        input_layout=layout,
        num_key_value_heads=nkv,
        **causal_mode(sliding_window),
        block_size=block_size,
    )
    out = out.view(1, t, n, d) if layout == "BSH" else out.transpose(1, 2)
    return out[..., :dm]


def mixed_attention(
    query, key, value, key_cache, value_cache, slot_mapping, cu_seq_lens, block_table, seq_lens, mask, *,
    layout: str, block_size: int, head_dim: int, scale: float, sliding_window: int,
):
    """query (1, N, T, Dm), key/value (1, Nkv, T, Dm) of packed new tokens of B sequences -> (1, T,
    N, Dm). Sequence b's tokens end at cu_seq_lens[b] and its KV, the new tokens included, is
    seq_lens[b] long: its i-th of q_b new tokens sees positions <= seq_lens[b] - q_b + i through
    block_table[b] (bottom-right causal; a window keeps the last `sliding_window` of those)."""
    if layout == "BNSD":  # FIA's TND reads (NB, bs, Nkv*D) pools only: one decode (IFA) row per token
        return _per_token(decode_attention, query, key, value, key_cache, value_cache, slot_mapping, cu_seq_lens,
                          block_table, seq_lens, layout=layout, block_size=block_size, head_dim=head_dim,
                          scale=scale, sliding_window=sliding_window)
    n, nkv, dm, d = query.shape[1], key.shape[1], query.shape[-1], head_dim
    q = _pad_last(query[0].transpose(0, 1), d)  # (T, N, D)
    write_new_tokens(key, value, key_cache, value_cache, slot_mapping, head_dim=d, layout=layout, block_size=block_size)
    out, _ = torch.ops.graphgen.npu_fused_infer_attention_score.tensor_lengths(
        q, key_cache, value_cache,
        atten_mask=mask,
        actual_seq_lengths=cu_seq_lens,
        actual_seq_lengths_kv=seq_lens,
        block_table=block_table,
        num_heads=n,
        scale=scale,
        input_layout="TND",
        num_key_value_heads=nkv,
        **causal_mode(sliding_window),
        block_size=block_size,
    )
    return out[..., :dm].unsqueeze(0)


def prefill_attention_portable(
    query, key, value, key_cache, value_cache, slot_mapping, cu_seq_lens, *, layout: str, block_size: int,
    head_dim: int, scale: float, sliding_window: int, softcap: float, sinks=None,
):
    """prefill_attention for a layer with softcap/sinks: the new tokens attend to each other
    (varlen, causal within each packed sequence) -> (1, T, N, Dm)."""
    dm = query.shape[-1]
    q = _pad_last(query[0].transpose(0, 1), head_dim)  # (T, N, D)
    k, v = write_new_tokens(key, value, key_cache, value_cache, slot_mapping, head_dim=head_dim, layout=layout,
                            block_size=block_size)
    out = torch.ops.graphgen.varlen_attention(q, k, v, cu_seq_lens, scale=scale, sliding_window=sliding_window,
                                              softcap=softcap, sinks=sinks)
    return out[..., :dm].unsqueeze(0)


def paged_attention_portable(
    query, key, value, key_cache, value_cache, slot_mapping, block_table, seq_lens, *, layout: str,
    block_size: int, head_dim: int, scale: float, sliding_window: int, softcap: float, sinks=None,
):
    """extend/decode_attention for a layer with softcap/sinks: query (B, N, Sq, Dm), key/value
    (B, Nkv, Sq, Dm) of the new tokens (written first) -> (B, Sq, N, Dm) over the pool."""
    dm, nkv = query.shape[-1], key.shape[1]
    write_new_tokens(key, value, key_cache, value_cache, slot_mapping, head_dim=head_dim, layout=layout,
                     block_size=block_size)
    out = torch.ops.graphgen.paged_attention(
        _pad_last(query, head_dim), key_cache, value_cache, block_table, seq_lens, num_key_value_heads=nkv,
        scale=scale, sliding_window=sliding_window, softcap=softcap, sinks=sinks,
    )
    return out[..., :dm]


def mixed_attention_portable(
    query, key, value, key_cache, value_cache, slot_mapping, cu_seq_lens, block_table, seq_lens, *, layout: str,
    block_size: int, head_dim: int, scale: float, sliding_window: int, softcap: float, sinks=None,
):
    """mixed_attention for a layer with softcap/sinks: one `graphgen::paged_attention` row per new
    token -> (1, T, N, Dm)."""
    return _per_token(paged_attention_portable, query, key, value, key_cache, value_cache, slot_mapping, cu_seq_lens,
                      block_table, seq_lens, layout=layout, block_size=block_size, head_dim=head_dim, scale=scale,
                      sliding_window=sliding_window, softcap=softcap, sinks=sinks)


def _per_token(attention, query, key, value, key_cache, value_cache, slot_mapping, cu_seq_lens, block_table,
               seq_lens, **attrs):
    """The mixed phase's packed tokens (query (1, N, T, Dm), key/value (1, Nkv, T, Dm)) through a
    decode-shaped `attention` (decode_attention, paged_attention_portable: one new token per row,
    written at its slot first), each token a row with its sequence's block table and the KV
    length it sees (`token_rows`) -> (1, T, N, Dm)."""
    table, lens = token_rows(cu_seq_lens, block_table, seq_lens, query.shape[2])
    q, k, v = (x[0].transpose(0, 1).unsqueeze(2) for x in (query, key, value))  # (T, heads, 1, Dm)
    out = attention(q, k, v, key_cache, value_cache, slot_mapping, table, lens, **attrs)
    return out.transpose(0, 1)  # (T, 1, N, Dm) -> (1, T, N, Dm)


def needs_portable(node: fx.Node) -> str | None:
    """Why this canonical node cannot lower to IFA/PFA/FIA (and takes the portable path), or None."""
    kw = node.kwargs
    if kw.get("softcap", 0.0):
        return f"logit softcap {kw['softcap']}"
    if kw.get("sinks") is not None:
        return "attention sinks"
    return None


def _placeholders(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "placeholder"]


def _add_inputs(gm: fx.GraphModule, names: list[str]) -> dict[str, fx.Node]:
    """Append placeholders `names` after the existing ones (reusing any that already exist)."""
    existing = {n.name: n for n in _placeholders(gm.graph)}
    last = _placeholders(gm.graph)[-1]
    added = {}
    for name in names:
        if name in existing:
            added[name] = existing[name]
            continue
        with gm.graph.inserting_after(last):
            last = added[name] = gm.graph.placeholder(name)
    return added


def _unsupported(node: fx.Node) -> str | None:
    kw = node.kwargs
    if not kw.get("causal", True):
        return "non-causal attention (a decoder LM is causal)"
    return None


def paged_attention(gm: fx.GraphModule, phase: str, spec: KVSpec) -> tuple[fx.GraphModule, PassRecord]:
    """Rewrite every canonical attention node of `gm` for `phase` ("prefill" | "extend" | "mixed" |
    "decode").

    gm is a plain-codegen GraphModule whose user inputs are input_ids/position_ids(/logits_indices);
    the pass appends the phase's remaining inputs and the pools (names in graphgen.spec), in order.
    Layers with a softcap or sinks take the portable ops (see the module docstring); raises
    ValueError naming the layer for what no paged form expresses (non-causal attention).
    """
    if phase not in PHASE_INPUTS:
        raise ValueError(f"phase must be one of {sorted(PHASE_INPUTS)}, got {phase!r}")
    record = PassRecord(name=f"paged_attention[{phase}]")
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is ATTENTION]
    for node in nodes:
        reason = _unsupported(node)
        if reason:
            raise ValueError(f"layer {node.kwargs.get('layer_idx')}: {reason}; this model cannot be paged yet")
    inputs = _add_inputs(gm, PHASE_INPUTS[phase] + cache_input_names(spec.num_layers))
    mask_node = None
    if phase in ("prefill", "extend", "mixed"):
        weights = next(iter(gm.parameters()), None)  # the mask lives where the model does (cpu, cuda)
        device = weights.device if weights is not None else "cpu"
        gm.register_buffer("compressed_causal_mask", compressed_causal_mask(device), persistent=False)
        with gm.graph.inserting_after(_placeholders(gm.graph)[-1]):
            mask_node = gm.graph.get_attr("compressed_causal_mask")
    for node in nodes:
        layer = node.kwargs["layer_idx"]
        q, k, v = node.args[:3]
        caches = (inputs[f"key_cache_{layer}"], inputs[f"value_cache_{layer}"])
        attrs = {
            "layout": spec.layout, "block_size": spec.block_size, "head_dim": spec.head_dim,
            "scale": node.kwargs["scale"], "sliding_window": node.kwargs.get("sliding_window", 0),
        }
        portable = needs_portable(node)
        if portable:
            attrs.update(softcap=float(node.kwargs.get("softcap", 0.0)), sinks=node.kwargs.get("sinks"))
            record.notes.append(f"layer {layer}: {portable} -> portable {phase} attention (cpu/cuda only)")
        with gm.graph.inserting_before(node):
            if portable and phase == "prefill":
                args = (q, k, v, *caches, inputs["slot_mapping"], inputs["cu_seq_lens"])
                new = gm.graph.call_function(prefill_attention_portable, args, attrs)
            elif portable and phase == "mixed":
                args = (q, k, v, *caches, inputs["slot_mapping"], inputs["cu_seq_lens"], inputs["block_table"],
                        inputs["seq_lens"])
                new = gm.graph.call_function(mixed_attention_portable, args, attrs)
            elif portable:
                args = (q, k, v, *caches, inputs["slot_mapping"], inputs["block_table"], inputs["seq_lens"])
                new = gm.graph.call_function(paged_attention_portable, args, attrs)
            elif phase == "prefill":
                args = (q, k, v, *caches, inputs["slot_mapping"], inputs["cu_seq_lens"], mask_node)
                new = gm.graph.call_function(prefill_attention, args, attrs)
            elif phase == "extend":
                args = (q, k, v, *caches, inputs["slot_mapping"], inputs["block_table"], inputs["seq_lens"], mask_node)
                new = gm.graph.call_function(extend_attention, args, attrs)
            elif phase == "mixed":
                args = (q, k, v, *caches, inputs["slot_mapping"], inputs["cu_seq_lens"], inputs["block_table"],
                        inputs["seq_lens"], mask_node)
                new = gm.graph.call_function(mixed_attention, args, attrs)
            else:
                args = (q, k, v, *caches, inputs["slot_mapping"], inputs["block_table"], inputs["seq_lens"])
                new = gm.graph.call_function(decode_attention, args, attrs)
        new.meta.update(node.meta)
        new.meta["graphgen_layer"] = layer
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        record.matched += 1
    if spec.head_dim != spec.model_head_dim:
        record.notes.append(f"head_dim {spec.model_head_dim} zero-padded to {spec.head_dim}")
    gm.graph.lint()
    gm.recompile()
    return gm, record


def plain_graph_module(ep: torch.export.ExportedProgram) -> fx.GraphModule:
    """The exported program as a GraphModule with plain positional inputs and one output (the
    pytree in/out codegen removed), parameters and buffers under their original names."""
    gm = ep.module()
    gm._forward_pre_hooks.clear()  # the unlifted module checks inputs against the exported tree spec
    # Guards of the capture's dims (batch, seq ranges) do not hold for the paged graphs' own dims.
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
            delattr(gm, "_guards_fn")
    gm.graph._codegen = fx.graph.CodeGen()
    out = next(n for n in gm.graph.nodes if n.op == "output")
    (value,) = out.args
    while isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    out.args = (value,)
    gm.recompile()
    return gm


__all__ = [
    "PassRecord", "compressed_causal_mask", "padded_head_dim", "paged_attention", "plain_graph_module",
    "prefill_attention", "extend_attention", "mixed_attention", "decode_attention", "write_kv", "needs_portable",
    "prefill_attention_portable", "paged_attention_portable", "mixed_attention_portable",
]
