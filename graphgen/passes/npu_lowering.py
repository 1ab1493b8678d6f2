"""NPU lowering: a paged graph's `graphgen.*` ops -> `torch.ops.npu.*`, one to one by schema.

Input: the plain GraphModule of a re-exported paged graph (`plain_graph_module(paged_ep)`), whose
attention runs as the `.tensor_lengths` overloads and whose KV writes are aten `index_copy_` (BSH
pool) or `index_put_` (BNSD pool) on the pool inputs. Output: the same graph with
- KV writes as `npu.npu_scatter_nd_update_(pool, indices, updates)`, indices `[block, offset]` per
  token (BNSD: `[block, head, offset]`), computed once from `slot_mapping`. Padded tokens already
  carry slots in the runtime's scratch block, so every index is in range.
- prefill (`prefill_tokens=L`, one padded sequence per bucket): PFA with the int lists
  `actual_seq_lengths=[L]`, `actual_seq_lengths_kv=[L]` as constants (PFA's converter rejects
  tensors). Real tokens sit first and causal masking keeps them exact; the trailing padding only
  attends to itself and writes its KV to the scratch block. `cu_seq_lens` stays an (unused) input.
- decode / extend: IFA / FIA with `SymInt[]` lengths from a new trailing input `seq_lens_host`, a
  Python int list the caller rebuilds from `seq_lens` at every call (never a cached list).
- `attention_ops="fia"`: FIA for prefill (BSND, constant lengths) and decode (SymInt[] KV lengths
  with block_table), `inner_precise=0`.
The compressed (2048, 2048) causal mask stays the graph constant it already is.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .paged_attention import PassRecord, _placeholders

NPU = torch.ops.npu
G = torch.ops.graphgen
# Input the lowering appends to decode/extend graphs, and the tensor input it is rebuilt from.
HOST_LENGTHS = {"decode": ("seq_lens_host", "seq_lens"), "extend": ("seq_lens_host", "seq_lens")}


def _npu_ops_available() -> None:
    if not hasattr(NPU, "npu_incre_flash_attention"):
        raise RuntimeError("torch.ops.npu.* is not registered: import torch_npu (on an Ascend machine) or call "
                           "graphgen.ops.emulate() before lowering")


def _after_inputs(graph: fx.Graph) -> fx.Node:
    """Where new nodes that read inputs go: after the last placeholder (get_attrs may precede them)."""
    return _placeholders(graph)[-1].next


def _call(graph: fx.Graph, target, args, kwargs=None) -> fx.Node:
    return graph.call_function(target, tuple(args), kwargs or {})


def _slot_indices(gm: fx.GraphModule, slot: fx.Node, block_size: int) -> fx.Node:
    """(T,) flat slots -> (T, 2) int64 [block, offset]."""
    g = gm.graph
    with g.inserting_before(_after_inputs(g)):
        blocks = _call(g, torch.ops.aten.div.Tensor_mode, (slot, block_size), {"rounding_mode": "floor"})
        offsets = _call(g, torch.ops.aten.remainder.Scalar, (slot, block_size))
        return _call(g, torch.ops.aten.stack.default, ([blocks, offsets], -1))


def _lower_kv_writes(gm: fx.GraphModule, pools: set[fx.Node], slot: fx.Node | None, block_size: int,
                     record: PassRecord) -> None:
    g = gm.graph
    nd_index = None
    for node in list(g.nodes):
        if node.op != "call_function":
            continue
        if node.target is torch.ops.aten.index_copy_.default:
            view, dim, index, src = node.args
            cache = view.args[0] if isinstance(view, fx.Node) and view.op == "call_function" else None
            if cache not in pools or dim != 0:
                continue
            if index is not slot:
                raise ValueError(f"{node.name}: KV write indexed by {index} instead of slot_mapping")
            if nd_index is None:
                nd_index = _slot_indices(gm, slot, block_size)
            with g.inserting_before(node):
                new = _call(g, NPU.npu_scatter_nd_update_.default, (cache, nd_index, src))
        elif node.target is torch.ops.aten.index_put_.default and node.args[0] in pools:
            cache, (blocks, heads, offsets), src = node.args[:3]
            with g.inserting_before(node):
                zero_h = _call(g, torch.ops.aten.mul.Tensor, (heads, 0))  # (1, N) zeros: broadcast to (T, N)
                zero_t = _call(g, torch.ops.aten.mul.Tensor, (blocks, 0))  # (T, 1)
                parts = [_call(g, torch.ops.aten.add.Tensor, (blocks, zero_h)),
                         _call(g, torch.ops.aten.add.Tensor, (heads, zero_t)),
                         _call(g, torch.ops.aten.add.Tensor, (offsets, zero_h))]
                index = _call(g, torch.ops.aten.stack.default, (parts, -1))  # (T, N, 3)
                new = _call(g, NPU.npu_scatter_nd_update_.default, (cache, index, src))
        else:
            continue
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        g.erase_node(node)
        record.matched += 1


def _lower_attention(gm: fx.GraphModule, phase: str, attention_ops: str, prefill_tokens: int | None,
                     host: fx.Node | None, record: PassRecord) -> None:
    g = gm.graph
    for node in list(g.nodes):
        if node.op != "call_function":
            continue
        if node.target not in (G.npu_prompt_flash_attention.tensor_lengths, G.npu_incre_flash_attention.tensor_lengths,
                               G.npu_fused_infer_attention_score.tensor_lengths):
            continue
        kw = dict(node.kwargs)
        q, k, v = node.args[:3]
        if node.target is G.npu_prompt_flash_attention.tensor_lengths:
            lengths = [prefill_tokens]
            kw["actual_seq_lengths"] = lengths
            kw["actual_seq_lengths_kv"] = list(lengths)
            with g.inserting_before(node):
                if attention_ops == "fia":
                    new = _prefill_fia(g, q, k, v, kw)
                else:
                    new = _call(g, NPU.npu_prompt_flash_attention.default, (q, k, v), kw)
        elif node.target is G.npu_incre_flash_attention.tensor_lengths:
            kw["actual_seq_lengths"] = host
            with g.inserting_before(node):
                if attention_ops == "fia":
                    fia_kw = {"atten_mask": kw.get("atten_mask"), "actual_seq_lengths_kv": host,
                              "block_table": kw["block_table"], "num_heads": kw["num_heads"],
                              "scale": kw.get("scale_value", 1.0), "input_layout": kw.get("input_layout", "BSH"),
                              "num_key_value_heads": kw.get("num_key_value_heads", 0),
                              "block_size": kw["block_size"], "inner_precise": 0}
                    out = _call(g, NPU.npu_fused_infer_attention_score.default, (q, k, v), fia_kw)
                    new = _call(g, operator.getitem, (out, 0))
                else:
                    new = _call(g, NPU.npu_incre_flash_attention.default, (q, k, v), kw)
        elif node.target is G.npu_fused_infer_attention_score.tensor_lengths:
            kw["actual_seq_lengths_kv"] = host
            with g.inserting_before(node):
                new = _call(g, NPU.npu_fused_infer_attention_score.default, (q, k, v), kw)
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        g.erase_node(node)
        record.matched += 1


def _prefill_fia(g: fx.Graph, q, k, v, pfa_kw: dict) -> fx.Node:
    """PFA over TND (T, N, D) -> FIA over BSND (1, T, N, D): FIA's TND takes head_dim 64/128/192
    only, BSND any multiple of 16; one sequence, so the lengths are the same constants."""
    q4, k4, v4 = (_call(g, torch.ops.aten.unsqueeze.default, (x, 0)) for x in (q, k, v))
    kw = {
        "atten_mask": pfa_kw.get("atten_mask"), "actual_seq_lengths": pfa_kw["actual_seq_lengths"],
        "actual_seq_lengths_kv": pfa_kw["actual_seq_lengths_kv"], "num_heads": pfa_kw["num_heads"],
        "scale": pfa_kw.get("scale_value", 1.0), "pre_tokens": pfa_kw.get("pre_tokens", 2147483647),
        "next_tokens": pfa_kw.get("next_tokens", 0), "input_layout": "BSND",
        "num_key_value_heads": pfa_kw.get("num_key_value_heads", 0), "sparse_mode": pfa_kw.get("sparse_mode", 0),
        "inner_precise": 0,
    }
    out = _call(g, NPU.npu_fused_infer_attention_score.default, (q4, k4, v4), kw)
    first = _call(g, operator.getitem, (out, 0))
    return _call(g, torch.ops.aten.squeeze.dim, (first, 0))


def npu_lowering(gm: fx.GraphModule, phase: str, *, block_size: int, attention_ops: str = "ifa_pfa",
                 prefill_tokens: int | None = None) -> tuple[fx.GraphModule, PassRecord]:
    """Lower `gm` (a plain paged GraphModule of `phase`) to torch.ops.npu.* (module docstring).

    prefill needs `prefill_tokens` (the bucket length L, baked in as the PFA/FIA lengths [L]);
    decode/extend gain the trailing input `seq_lens_host` (list[int], one per sequence).
    Returns the graph and a record whose `matched` counts rewritten nodes (attention + KV writes).
    """
    _npu_ops_available()
    if attention_ops not in ("ifa_pfa", "fia"):
        raise ValueError(f"attention_ops must be ifa_pfa or fia, got {attention_ops!r}")
    if phase == "prefill" and (not isinstance(prefill_tokens, int) or prefill_tokens < 1):
        raise ValueError("prefill lowering needs prefill_tokens, the bucket's token count (PFA takes constant lengths)")
    record = PassRecord(name=f"npu_lowering[{phase},{attention_ops}]")
    inputs = {n.name: n for n in _placeholders(gm.graph)}
    pools = {n for name, n in inputs.items() if name.startswith(("key_cache_", "value_cache_"))}
    host = None
    if phase in HOST_LENGTHS:
        name, _ = HOST_LENGTHS[phase]
        with gm.graph.inserting_after(_placeholders(gm.graph)[-1]):
            host = gm.graph.placeholder(name)
    _lower_kv_writes(gm, pools, inputs.get("slot_mapping"), block_size, record)
    _lower_attention(gm, phase, attention_ops, prefill_tokens, host, record)
    leftover = [n.name for n in gm.graph.nodes if n.op == "call_function"
                and getattr(n.target, "namespace", None) == "graphgen"]
    if leftover:
        raise ValueError(f"npu lowering left graphgen ops with no torch_npu counterpart: {leftover[:5]}")
    if phase == "prefill":
        record.notes.append(f"prefill bucket of {prefill_tokens} tokens: lengths [{prefill_tokens}] are constants")
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    # A plain GraphModule (the unlifted export module carries unpicklable state hooks), so the
    # lowered graph can be saved and handed to torch.compile / cache_compile as an nn.Module.
    gm.graph._tracer_cls = None  # unpickling re-traces the code with this tracer: plain fx is enough
    gm.graph._tracer_extras = {}
    return fx.GraphModule(gm, gm.graph, class_name=f"NpuLowered_{phase}"), record


def lowered_calls(gm: fx.GraphModule) -> list[fx.Node]:
    """The torch.ops.npu.* calls of a lowered graph (for lint and tests)."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and getattr(n.target, "namespace", None) == "npu"]


__all__ = ["HOST_LENGTHS", "lowered_calls", "npu_lowering"]
