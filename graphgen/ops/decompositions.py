"""The serving forms of the attention ops as plain ATen, for compilers that run them on CPU/CUDA.

The reference kernels are Python: inside an AOTInductor graph every call goes back into the
interpreter (argument boxing, the general driver's checks and layout plumbing), which dominated
small-model decode. A backend that compiles for cpu/cuda may first replace the common calls with
these decompositions so the whole step is compiled code:

- `npu_incre_flash_attention.tensor_lengths` over a paged float cache with only the KV lengths
  deciding visibility (the decode graph's call): `graphgen::paged_decode_attention`
  (ops/paged_decode.py) over (NB, bs, Nkv, D) views of the pools. On the CPU, for fp32 and bf16,
  that is graphgen's kernel, which reads only the visible positions; elsewhere its ATen form
  (gather every block of the table, mask positions >= seq_len, softmax, weighted sum), inlined.
  Same math as `_core.attend`.
- `npu_prompt_flash_attention.tensor_lengths` on packed TND tokens with sparse_mode 3/4 and one
  lengths tensor for queries and keys (the prefill graph's call): causal (and banded) attention
  within each packed sequence: on the CPU, for fp32 and bf16 without a band, graphgen's kernel
  `graphgen::packed_causal_attention` (ops/packed_causal.py: ATen's flash attention one sequence
  at a time); elsewhere one `scaled_dot_product_attention` over all tokens with a block-diagonal
  boolean mask, inlined.

- `npu_fused_infer_attention_score.tensor_lengths` on packed TND tokens over a paged float cache,
  sparse_mode 3 (the mixed graph's call: chunked prefill beside decode rows), where graphgen's CPU
  kernel runs: one paged-decode row per token (`paged_decode.token_rows`: its sequence's
  block-table row, the KV length it sees), no separate kernel for Q_S > 1. Elsewhere the call
  stays the reference kernel's, which gathers each sequence's KV once (ATen's paged-decode form
  would gather it once per token).

- `aten.linear` in fp32 or bf16 on CPU: `graphgen::gemv_linear` (ops/gemv_linear.py), whose C
  shim the compiled graph calls directly: an AVX2 GEMV for 1-3 rows, panels (an outer-product
  GEMM) for 4 or more, ATen's mm for bf16 past 16 rows where the CPU has AVX512-BF16, and oneDNN's
  inner product (fp32) or ATen's mm (bf16) for strided operands. ATen's fp32 linear is
  MKL, which on this project's AVX2 AMD machines runs a batch-1 GEMV on one thread; its bf16 GEMV
  streams ~12 GB/s against the kernel's ~19 (docs/performance.md).
  Where the kernels cannot be built: fp32 takes oneDNN's inner product (`mkldnn._linear_pointwise`),
  bf16 keeps ATen's linear (oneDNN refuses plain bf16 weights without AVX512-BF16).
  Linears without bias that read the same x (a layer's q, k and v projections; gate and up) are
  served together, 3 or 2 at a time: `graphgen::gemv_linear3` / `gemv_linear2`, one pass over all
  their weights (`serving_linears`). A gated MLP's silu(gate) * up over such a pair becomes one
  `graphgen::gemv_gated` call (`fuse_gated_mlps`): the product is written, the up projection's output
  and the elementwise kernel are never made.

Anything else (masks, pse, quantization, padding, other modes) returns NotImplemented and stays a
call of the reference kernel (or ATen's own decomposition). Static checks already ran in the fake
kernels when the graph was exported; indexing the pools through the block table is bounds-checked
by the compiled code and by the kernel.
"""
from __future__ import annotations

import operator
from collections import defaultdict

import torch

from . import cpu_kernels
from . import packed_causal as packed_causal_op
from . import paged_decode as paged_decode_op
from ._checks import known_true

IFA = torch.ops.graphgen.npu_incre_flash_attention.tensor_lengths
FIA = torch.ops.graphgen.npu_fused_infer_attention_score.tensor_lengths
PFA = torch.ops.graphgen.npu_prompt_flash_attention.tensor_lengths
LINEAR = torch.ops.aten.linear.default
FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_IFA_PLAIN_NONE = ("padding_mask", "atten_mask", "pse_shift", "antiquant_scale", "antiquant_offset",
                   "dequant_scale1", "quant_scale1", "dequant_scale2", "quant_scale2", "quant_offset2",
                   "kv_padding_size")
_PFA_PLAIN_NONE = ("padding_mask", "pse_shift", "deq_scale1", "quant_scale1", "deq_scale2", "quant_scale2",
                   "quant_offset2")
_FIA_PLAIN_NONE = ("pse_shift", "dequant_scale1", "quant_scale1", "dequant_scale2", "quant_scale2", "quant_offset2",
                   "antiquant_scale", "antiquant_offset", "key_antiquant_scale", "key_antiquant_offset",
                   "value_antiquant_scale", "value_antiquant_offset", "query_padding_size", "kv_padding_size",
                   "key_shared_prefix", "value_shared_prefix", "actual_shared_prefix_len", "query_rope", "key_rope",
                   "key_rope_antiquant_scale")


def paged_decode(query, key_cache, value_cache, block_table, seq_lens, *, num_heads: int, num_kv_heads: int,
                 scale: float, layout: str, block_size: int) -> torch.Tensor:
    """query (B, 1, N*D) BSH / (B, 1, N, D) BSND / (B, N, 1, D) BNSD over pools (NB, bs, Nkv*D) or
    (NB, Nkv, bs, D) -> the query's shape and dtype. Rows with seq_len 0 are zero."""
    b = query.shape[0]
    if layout == "BSH":
        d = query.shape[-1] // num_heads
        q = query.reshape(b, num_heads, d)
    elif layout == "BSND":
        d = query.shape[-1]
        q = query[:, 0]
    else:
        d = query.shape[-1]
        q = query[:, :, 0]
    if key_cache.dim() == 3:  # (NB, bs, Nkv*D) -> (NB, bs, Nkv, D), a view
        caches = [c.view(c.shape[0], block_size, num_kv_heads, d) for c in (key_cache, value_cache)]
    else:  # (NB, Nkv, bs, D) -> (NB, bs, Nkv, D), a strided view
        caches = [c.transpose(1, 2) for c in (key_cache, value_cache)]
    if paged_decode_op.kernel_runs(q):
        out = torch.ops.graphgen.paged_decode_attention(q, *caches, block_table, seq_lens, scale)
    else:
        out = paged_decode_op.aten_paged_decode(q, *caches, block_table, seq_lens, scale)
    if layout == "BSH":
        return out.reshape(b, 1, num_heads * d)
    if layout == "BSND":
        return out.reshape(b, 1, num_heads, d)
    return out.reshape(b, num_heads, 1, d)


def _ifa(query, key, value, **kw):
    lens = kw.get("actual_seq_lengths")
    if any(kw.get(name) is not None for name in _IFA_PLAIN_NONE) or kw.get("block_table") is None \
            or lens is None or query.dtype not in FLOATS or key.dtype != query.dtype \
            or not known_true(lens.shape[0] == query.shape[0]):
        return NotImplemented
    layout = kw.get("input_layout", "BSH")
    n = kw.get("num_heads", 1)
    if layout == "BSH":
        nkv = kw.get("num_key_value_heads", 0) or n
    elif layout in ("BSND", "BNSD"):
        n = query.shape[2] if layout == "BSND" else query.shape[1]
        nkv = key.shape[1] if layout == "BNSD" else (kw.get("num_key_value_heads", 0) or n)
    else:
        return NotImplemented
    return paged_decode(query, key, value, kw["block_table"], kw["actual_seq_lengths"], num_heads=n,
                        num_kv_heads=nkv, scale=kw.get("scale_value", 1.0), layout=layout,
                        block_size=kw.get("block_size", 0))


def _fia(query, key, value, **kw):
    lens, lens_kv, table = kw.get("actual_seq_lengths"), kw.get("actual_seq_lengths_kv"), kw.get("block_table")
    if any(kw.get(name) is not None for name in _FIA_PLAIN_NONE) or kw.get("input_layout", "BSH") != "TND" \
            or table is None or lens is None or lens_kv is None or kw.get("sparse_mode", 0) != 3 \
            or kw.get("atten_mask") is None or kw.get("softmax_lse_flag", False) or query.dtype not in FLOATS \
            or key.dtype != query.dtype or key.dim() != 3 or not paged_decode_op.kernel_runs(query):
        return NotImplemented  # without the kernel, the reference gathers per sequence, not per token
    t, n, d = query.shape
    rows, row_lens = paged_decode_op.token_rows(lens, table, lens_kv, t)
    out = paged_decode(query.unsqueeze(1), key, value, rows, row_lens, num_heads=n,
                       num_kv_heads=kw.get("num_key_value_heads", 0) or n, scale=kw.get("scale", 1.0),
                       layout="BSND", block_size=kw.get("block_size", 0))
    return out.reshape(t, n, d), query.new_zeros((1,), dtype=torch.float32)


def packed_causal(query, key, value, cu_seq_lens, *, scale: float, pre_tokens: int | None) -> torch.Tensor:
    """query (T, N, D), key/value (T, Nkv, D) packed, cu_seq_lens (K,) cumulative ends: token i sees
    token j of its own sequence when j <= i (and i - j <= pre_tokens) -> (T, N, D); tokens past the
    last end are zero."""
    if pre_tokens is None and packed_causal_op.kernel_runs(query):
        return torch.ops.graphgen.packed_causal_attention(query, key, value, cu_seq_lens, scale)
    return packed_causal_op.masked_packed_causal(query, key, value, cu_seq_lens, scale=scale, pre_tokens=pre_tokens)


def _pfa(query, key, value, **kw):
    lens, lens_kv = kw.get("actual_seq_lengths"), kw.get("actual_seq_lengths_kv")
    mode = kw.get("sparse_mode", 0)
    if any(kw.get(name) is not None for name in _PFA_PLAIN_NONE) or kw.get("input_layout", "BSH") != "TND" \
            or lens is None or lens is not lens_kv or mode not in (3, 4) or query.dtype not in FLOATS \
            or key.dtype != query.dtype or kw.get("atten_mask") is None:
        return NotImplemented
    pre, nxt = kw.get("pre_tokens", 2147483647), kw.get("next_tokens", 0)
    if mode == 4 and nxt != 0:
        return NotImplemented
    return packed_causal(query, key, value, lens, scale=kw.get("scale_value", 1.0),
                         pre_tokens=pre if mode == 4 else None)


def _cpu_linear(x, weight) -> bool:
    """Whether x @ weight.T is a CPU linear of one dtype (what the serving forms take)."""
    return x.device.type == "cpu" and weight.device.type == "cpu" and weight.dim() == 2 and x.dtype == weight.dtype


def _kernel_takes(x) -> bool:
    """Whether graphgen's linear kernel takes a CPU linear of x's dtype."""
    return x.dtype in (torch.float32, torch.bfloat16) and cpu_kernels.available()


def _linear(x, weight, bias=None):
    if not _cpu_linear(x, weight) or (bias is not None and bias.dtype != x.dtype):
        return NotImplemented
    if _kernel_takes(x):
        y = torch.ops.graphgen.gemv_linear(x, weight)
        return y if bias is None else y + bias
    if x.dtype == torch.float32 and onednn_linear_available():
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return NotImplemented


def onednn_linear_available() -> bool:
    """Whether this torch build has oneDNN's linear (`torch.ops.mkldnn._linear_pointwise`)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def serving_decompositions() -> dict:
    """op overload -> decomposition (NotImplemented where it does not apply), in the form of
    `ExportedProgram.run_decompositions`' table."""
    return {IFA: _ifa, PFA: _pfa, FIA: _fia, LINEAR: _linear}


def inline_serving_forms(gm: torch.fx.GraphModule) -> int:
    """Point every call of a serving-decomposed op in `gm` at a function that runs the
    decomposition, or the op itself where the decomposition returns NotImplemented; returns how
    many calls were redirected. Sibling linears become one call of `serving_linears` first
    (`group_sibling_linears`), and a gated MLP's silu(gate) * up over such a pair one call of
    `serving_gated` (`fuse_gated_mlps`). The next trace of `gm` (AOTInductor's own) then traces the serving
    forms in place, which spares a whole-graph retrace of `run_decompositions` per graph."""
    count = group_sibling_linears(gm)
    fuse_gated_mlps(gm)
    table = serving_decompositions()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in table:
            node.target = _serving_form(node.target, table[node.target])
            count += 1
    if count:
        gm.recompile()
    return count


def group_sibling_linears(gm: torch.fx.GraphModule) -> int:
    """Replace linears without bias that read the same x (a layer's q, k and v projections; gate
    and up) by calls of `serving_linears` over 3 or 2 of their weights at a time, in graph order
    (4 siblings: 2 + 2; a last single one stays a linear), each call just before the first linear
    it replaces. A sibling whose weight is computed after that point stays on its own. Returns how
    many linears it replaced."""
    siblings: dict[torch.fx.Node, list[torch.fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is LINEAR and not node.kwargs \
                and (len(node.args) == 2 or node.args[2] is None):
            siblings[node.args[0]].append(node)
    order = {node: i for i, node in enumerate(gm.graph.nodes)}

    def movable(weight, first: torch.fx.Node) -> bool:  # defined before `first`, or a parameter read
        return not isinstance(weight, torch.fx.Node) or weight.op == "get_attr" or order[weight] < order[first]

    replaced = 0
    for nodes in siblings.values():
        nodes = [node for node in nodes if movable(node.args[1], nodes[0])]
        while len(nodes) >= 2:
            take = 2 if len(nodes) in (2, 4) else 3
            _serve_together(gm, nodes[:take], order)
            replaced += take
            nodes = nodes[take:]
    if replaced:
        gm.graph.lint()
        gm.recompile()
    return replaced


def fuse_gated_mlps(gm: torch.fx.GraphModule) -> int:
    """Replace silu(gate) * up, where gate and up are the two outputs of one `serving_linears` call
    (a gated MLP's first half, after `group_sibling_linears`) and nothing else reads them, by one
    `serving_gated` call. Returns how many it replaced."""
    silu, mul = torch.ops.aten.silu.default, torch.ops.aten.mul.Tensor
    fused = 0
    for call in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is serving_linears]:
        if len(call.args) != 3 or len(call.users) != 2:
            continue
        items = sorted((item for item in call.users if item.target is operator.getitem), key=lambda i: i.args[1])
        if len(items) != 2 or any(len(item.users) != 1 for item in items):
            continue
        which = [i for i, item in enumerate(items) if next(iter(item.users)).target is silu]
        if len(which) != 1:
            continue
        gate, up = items[which[0]], items[1 - which[0]]
        act = next(iter(gate.users))
        product = next(iter(act.users)) if len(act.users) == 1 else None
        if product is None or product.target is not mul or product.kwargs or len(product.args) != 2 \
                or set(product.args) != {act, up}:
            continue
        x, weights = call.args[0], call.args[1:]
        with gm.graph.inserting_before(product):
            fused_call = gm.graph.call_function(serving_gated, (x, weights[which[0]], weights[1 - which[0]]))
        product.replace_all_uses_with(fused_call)
        for node in (product, act, up, gate, call):
            gm.graph.erase_node(node)
        fused += 1
    if fused:
        gm.graph.lint()
        gm.recompile()
    return fused


def _serve_together(gm: torch.fx.GraphModule, linears: list[torch.fx.Node], order: dict) -> None:
    """One `serving_linears` call in place of `linears` (siblings in graph order), just before the
    first: parameter reads after it move up (they have no inputs)."""
    first = linears[0]
    weights = [node.args[1] for node in linears]
    for w in weights:
        if isinstance(w, torch.fx.Node) and order[w] > order[first]:
            first.prepend(w)
    with gm.graph.inserting_before(first):
        call = gm.graph.call_function(serving_linears, (first.args[0], *weights))
    for i, node in enumerate(linears):
        with gm.graph.inserting_after(call):
            item = gm.graph.call_function(operator.getitem, (call, i))
        node.replace_all_uses_with(item)
        gm.graph.erase_node(node)


def serving_linears(x: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """x @ w.T for each of 2 or 3 weights: one pass of `graphgen::gemv_linear2/3` where graphgen's
    kernel takes the linear (`_linear`'s conditions, no bias), else each weight's own serving form."""
    ops = {2: torch.ops.graphgen.gemv_linear2, 3: torch.ops.graphgen.gemv_linear3}
    if len(weights) in ops and _kernel_takes(x) and all(_cpu_linear(x, w) for w in weights):
        return ops[len(weights)](x, *weights)
    linear = _serving_form(LINEAR, _linear)
    return tuple(linear(x, w) for w in weights)


def serving_gated(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T): one pass of `graphgen::gemv_gated` where graphgen's kernel takes
    the linears and the weights are of one shape, else `serving_linears` and ATen's silu and mul."""
    if _kernel_takes(x) and _cpu_linear(x, gate) and _cpu_linear(x, up) and gate.shape == up.shape:
        return torch.ops.graphgen.gemv_gated(x, gate, up)
    g, u = serving_linears(x, gate, up)
    return torch.nn.functional.silu(g) * u


def _serving_form(op, decomposition):
    def serve(*args, **kwargs):
        out = decomposition(*args, **kwargs)
        return op(*args, **kwargs) if out is NotImplemented else out

    serve.__name__ = serve.__qualname__ = f"serving_{op.name().split('::')[-1]}_{op._overloadname}"
    return serve
