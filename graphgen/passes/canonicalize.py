"""Canonicalize (fallback): `aten.scaled_dot_product_attention` -> canonical `graphgen::attention`.

For graphs exported without graphgen's AttentionInterface (e.g. attn_implementation="sdpa"). Per
SDPA node, in graph order (= layer order):
- K/V: transformers' repeat_kv (unsqueeze(2) -> expand -> reshape) is stripped, since the
  canonical node does GQA itself; `enable_gqa` needs nothing.
- mask: None -> causal = is_causal. A materialized mask is classified by *evaluating* its
  subgraph on one probe sequence of the graph's longest length (positions 0..S-1, the capture
  contract): causal, causal with a sliding window w (`kv_idx > q_idx - w`), or full. How
  transformers builds it (packed-sequence checks, vmap, overlays) varies between releases; what it
  means on the capture contract does not. Anything else (padding, chunked, data-dependent) is
  skipped with the reason, never guessed.
- output: SDPA gives (B, N, S, D), the canonical node (B, S, N, D): the model's
  [reshape to the same shape ->] transpose(1, 2) is absorbed, else a transpose is inserted.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch._inductor.pattern_matcher import CallFunction, Ignored, KeywordArg, Match

from .paged_attention import PassRecord
from .subgraph import ancestors, standalone

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
ATTENTION = torch.ops.graphgen.attention.default
# Evaluating a mask costs S*S bools; beyond this we probe at this length and say so in the record.
MAX_PROBE_LEN = 4096

# transformers' repeat_kv: x[:, :, None].expand(B, Nkv, rep, S, D).reshape(B, Nkv * rep, S, D)
REPEAT_KV = [
    CallFunction(view, CallFunction(aten.expand.default, CallFunction(aten.unsqueeze.default, KeywordArg("kv"), 2),
                                    Ignored()), Ignored())
    for view in (aten.reshape.default, aten.view.default, aten._unsafe_view.default)
]


def canonicalize(gm: fx.GraphModule, *, max_seq_len: int | None = None) -> tuple[fx.GraphModule, PassRecord]:
    """Rewrite every SDPA node of `gm` (in place) into one graphgen.attention node; returns (gm, record).

    max_seq_len: the length masks are probed at (default: the upper bound of the graph's
    sequence dim, capped at MAX_PROBE_LEN). A window >= that length is no window at all.
    """
    record = PassRecord(name="canonicalize")
    sdpa_nodes = list(gm.graph.find_nodes(op="call_function", target=SDPA))
    probe_len = max_seq_len or _probe_len(gm, record)
    for layer_idx, node in enumerate(sdpa_nodes):
        reason = _rewrite(gm, node, layer_idx, probe_len)
        if reason is None:
            record.matched += 1
        else:
            record.skipped.append(f"{node.name} (layer {layer_idx}): {reason}")
    gm.graph.eliminate_dead_code()
    # SDPA is tagged nondeterministic (dropout), so DCE keeps it; drop the replaced ones by hand.
    for node in sdpa_nodes:
        if not node.users:
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm, record


def _rewrite(gm: fx.GraphModule, node: fx.Node, layer_idx: int, probe_len: int) -> str | None:
    """Replace one SDPA node; returns None on success or why it was left alone."""
    query, key, value, attn_mask, dropout_p, is_causal = _sdpa_args(node)
    if dropout_p:
        return f"dropout_p={dropout_p}; export the model in eval mode"
    if attn_mask is None:
        causal, window = bool(is_causal), 0
    else:
        found = _classify_mask(gm, attn_mask, probe_len)
        if isinstance(found, str):
            return found
        causal, window = found
    key, value = _strip_repeat_kv(key), _strip_repeat_kv(value)
    head_dim = query.meta["val"].shape[-1]
    scale = node.kwargs.get("scale")
    with gm.graph.inserting_after(node):
        canonical = gm.graph.call_function(
            ATTENTION,
            (query, key, value),
            {
                "layer_idx": layer_idx,
                "scale": float(scale) if scale is not None else float(head_dim) ** -0.5,
                "causal": causal,
                "sliding_window": window,
                "softcap": 0.0,
                "sinks": None,
                "num_key_value_heads": int(key.meta["val"].shape[1]),
            },
        )
    canonical.meta = {**node.meta, "val": ATTENTION(query.meta["val"], key.meta["val"], value.meta["val"],
                                                    layer_idx=layer_idx, scale=1.0)}
    transpose = _output_transpose(node)
    if transpose is not None:
        transpose.replace_all_uses_with(canonical)
    else:  # keep SDPA's (B, N, S, D) for whatever reads it
        with gm.graph.inserting_after(canonical):
            back = gm.graph.call_function(aten.transpose.int, (canonical, 1, 2))
        back.meta = {**node.meta, "val": node.meta["val"]}
        node.replace_all_uses_with(back)
    return None


def _sdpa_args(node: fx.Node):
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    defaults = (None, None, None, None, 0.0, False)
    bound = dict(zip(names, defaults))
    bound.update(zip(names, node.args))
    bound.update({k: v for k, v in node.kwargs.items() if k in bound})
    return tuple(bound[n] for n in names)


def _strip_repeat_kv(node: fx.Node) -> fx.Node:
    for pattern in REPEAT_KV:
        m = pattern.match(node)
        if isinstance(m, Match):
            kv = m.kwargs["kv"]
            if kv.meta["val"].dim() == 4:
                return kv
    return node


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    return [str(s) for s in a.meta["val"].shape] == [str(s) for s in b.meta["val"].shape]


def _output_transpose(node: fx.Node) -> fx.Node | None:
    """The transpose(1, 2) the model applies to SDPA's output, through reshapes that keep the shape
    (transformers' pack_gqa undo), when nothing else reads the intermediate values."""
    cur = node
    while len(cur.users) == 1:
        user = next(iter(cur.users))
        if user.target in (aten.reshape.default, aten.view.default, aten.clone.default, aten.contiguous.default) \
                and _same_shape(user, node):
            cur = user
            continue
        if user.target == aten.transpose.int and sorted(d % 4 for d in user.args[1:3]) == [1, 2]:
            return user
        return None
    return None


def _probe_len(gm: fx.GraphModule, record: PassRecord) -> int:
    """Upper bound of the sequence dim (dim 1 of the int (B, S) inputs), capped at MAX_PROBE_LEN."""
    upper = None
    for ph in gm.graph.find_nodes(op="placeholder"):
        val = ph.meta.get("val")
        if isinstance(val, torch.Tensor) and not val.is_floating_point() and val.dim() == 2:
            s = val.shape[1]
            if isinstance(s, torch.SymInt):
                bound = s.node.shape_env.bound_sympy(s.node.expr).upper
                upper = int(bound) if bound.is_finite else None
            else:
                upper = int(s)
            break
    if upper is None or upper > MAX_PROBE_LEN:
        record.notes.append(f"masks probed at {MAX_PROBE_LEN} tokens: a window longer than that is taken as none")
        return MAX_PROBE_LEN
    return upper


def _classify_mask(gm: fx.GraphModule, mask: fx.Node, probe_len: int) -> tuple[bool, int] | str:
    """(causal, sliding_window) the mask means on the capture contract, or why it cannot say."""
    visible = _evaluate(gm, mask, probe_len)
    if isinstance(visible, str):
        return visible
    if visible.dim() == 4:
        if not bool((visible == visible[:1, :1]).all()):
            return "the mask differs between batch rows or heads (padding?); capture without padding"
        visible = visible[0, 0]
    s = probe_len
    i = torch.arange(s).view(s, 1)
    j = torch.arange(s).view(1, s)
    if visible.shape != (s, s):
        return f"mask has shape {tuple(visible.shape)} for a {s}-token probe"
    if bool(visible.all()):
        return False, 0
    causal = j <= i
    if bool((visible == causal).all()):
        return True, 0
    window = int(visible.sum(-1).max())
    if bool((visible == (causal & (j > i - window))).all()):
        return True, window
    return "the mask is neither causal, causal with a sliding window, nor full"


def _evaluate(gm: fx.GraphModule, mask: fx.Node, probe_len: int) -> torch.Tensor | str:
    """Run the mask's subgraph alone on one probe sequence; bool (.., S, S), True = visible."""
    for n in ancestors(mask):
        if n.op == "placeholder":
            val = n.meta.get("val")
            if not (isinstance(val, torch.Tensor) and not val.is_floating_point() and val.dim() == 2):
                return f"the mask reads {n.name}, which is not a (batch, seq) int input"
        elif n.op == "get_attr" or (n.op == "call_function" and n.target in (SDPA, ATTENTION)):
            return f"the mask reads {n.name} (model state or activations), not only token positions"
    module, inputs = standalone(gm, mask)
    probe = torch.arange(probe_len).unsqueeze(0)
    try:
        out = module(*[probe.clone() for _ in inputs])
    except Exception as exc:  # noqa: BLE001  (any failure means: cannot classify, say why)
        return f"evaluating the mask on a {probe_len}-token probe failed: {type(exc).__name__}: {exc}"
    if out.dtype == torch.bool:
        return out
    return out > torch.finfo(out.dtype).min / 2  # additive float mask: 0 visible, large negative masked
