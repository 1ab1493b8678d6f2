"""Constraint lint: every torchair graph-mode rule of reference/npu-ops.md, checked on a graph.

`lint(graphs, context)` walks the canonical and the paged graphs and returns a `LintReport`: one
`Finding` per violated rule, naming the rule, the layer, the node, the offending value and the fix.
Errors mean the artifact cannot run on the NPU as built; on cpu/cuda the graphs still run (their
ops are exact there) and the manifest marks the artifact as not NPU-portable.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx

from .subgraph import meta_value

ATTENTION = torch.ops.graphgen.attention.default
NPU_DTYPES = (torch.float16, torch.bfloat16)
MAX_GQA_RATIO = 64
MAX_HEAD_DIM = 512
IFA_MAX_HEADS = 256


@dataclass
class Finding:
    rule: str
    severity: str  # "error" (not NPU-expressible) | "warning" (works, but slow or fragile) | "info"
    layer: int | None
    node: str
    value: Any
    fix: str

    def line(self) -> str:
        where = f"layer {self.layer}" if self.layer is not None else "graph"
        return f"[{self.severity}] {self.rule} ({where}, {self.node}): {self.value} -> {self.fix}"


@dataclass
class LintReport:
    findings: list[Finding] = field(default_factory=list)
    checked_nodes: int = 0

    @property
    def npu_expressible(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)

    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    def to_dict(self) -> dict:
        return {
            "npu_expressible": self.npu_expressible,
            "checked_nodes": self.checked_nodes,
            "findings": [asdict(f) for f in self.findings],
        }


@dataclass
class LintContext:
    """What the lint needs beyond the graph: the recipe's target, the KV spec and the prefill form."""

    target: str
    dtype: torch.dtype
    block_size: int
    kv_dtype: str  # "auto" | "int8"
    prefill: str  # "varlen" | "buckets"
    attention_ops: str = "ifa_pfa"
    head_dim_padding: str = "pad"
    # target npu only (compile.torchair); None: not compiled with torchair.
    torchair_mode: str | None = None
    frozen_parameter: bool = False
    export_air: bool = False
    tiling_schedule_optimize: bool = False


_LAYER = re.compile(r"layers?[._](\d+)")


def layer_of(node: fx.Node) -> int | None:
    """The decoder layer a node belongs to, from its kwargs or its module stack."""
    if "layer_idx" in node.kwargs:
        return int(node.kwargs["layer_idx"])
    for _, (path, _) in reversed(list((node.meta.get("nn_module_stack") or {}).items())):
        m = _LAYER.search(str(path))
        if m:
            return int(m.group(1))
    return None


def _canonical(node: fx.Node, ctx: LintContext, out: list[Finding]) -> None:
    layer, name, kw = layer_of(node), node.name, node.kwargs
    q, k = meta_value(node.args[0]), meta_value(node.args[1])
    if kw.get("softcap"):
        out.append(Finding("softcap", "error", layer, name, kw["softcap"],
                           "no NPU flash-attention op applies a logit softcap; this layer runs the portable "
                           "graphgen::varlen_attention / paged_attention kernels (cpu/cuda only)"))
    if kw.get("sinks") is not None:
        out.append(Finding("sinks", "error", layer, name, "per-head sink logits",
                           "IFA/PFA/FIA have no sink input (only the training op does); this layer runs the "
                           "portable graphgen::varlen_attention / paged_attention kernels (cpu/cuda only)"))
    if not kw.get("causal", True):
        out.append(Finding("non_causal", "error", layer, name, "causal=False",
                           "paged decoding needs causal attention"))
    if q is None or k is None:
        return
    n, d, nkv = q.shape[1], q.shape[-1], k.shape[1]
    if n % nkv or n // nkv > MAX_GQA_RATIO:
        out.append(Finding("gqa_ratio", "error", layer, name, f"{n} heads / {nkv} kv heads",
                           f"num_heads must be a multiple of num_key_value_heads with ratio <= {MAX_GQA_RATIO}"))
    if n > IFA_MAX_HEADS:
        out.append(Finding("ifa_heads", "error", layer, name, n, f"IFA takes at most {IFA_MAX_HEADS} heads"))
    align = 32 if ctx.kv_dtype == "int8" else 16
    if d % align:
        if ctx.head_dim_padding == "pad":
            out.append(Finding("head_dim", "info", layer, name, d,
                               f"zero-padded to {-(-d // align) * align} in the KV pool (exact)"))
        else:
            out.append(Finding("head_dim", "error", layer, name, d,
                               f"head_dim must be a multiple of {align}; set head_dim_padding: pad"))
    if d > MAX_HEAD_DIM:
        out.append(Finding("head_dim", "error", layer, name, d, f"head_dim must be at most {MAX_HEAD_DIM}"))


_PAGED_OPS = ("npu_incre_flash_attention", "npu_prompt_flash_attention", "npu_fused_infer_attention_score")


def _op_name(node: fx.Node) -> str | None:
    if node.op != "call_function":
        return None
    name = getattr(node.target, "__name__", "")  # e.g. "npu_incre_flash_attention.tensor_lengths"
    base = name.split(".")[0]
    return base if base in _PAGED_OPS else None


def _paged(node: fx.Node, op: str, ctx: LintContext, out: list[Finding]) -> None:
    layer, name, kw = layer_of(node), node.name, node.kwargs
    lengths = kw.get("actual_seq_lengths")
    if op == "npu_prompt_flash_attention":
        if isinstance(lengths, fx.Node) and ctx.target == "npu":
            out.append(Finding("pfa_tensor_lengths", "error", layer, name, "actual_seq_lengths is a tensor",
                               "PFA's graph converter takes int lists only: use graphs.prefill: {buckets: [...]} "
                               "(fixed lengths per bucket)"))
        sparse = kw.get("sparse_mode", 0)
        if sparse not in range(5):
            out.append(Finding("sparse_mode", "error", layer, name, sparse, "PFA accepts sparse_mode 0-4"))
        mask = meta_value(kw.get("atten_mask"))
        if sparse in (2, 3, 4) and (mask is None or tuple(mask.shape[-2:]) != (2048, 2048)):
            out.append(Finding("compressed_mask", "error", layer, name, None if mask is None else tuple(mask.shape),
                               "sparse_mode 2/3/4 take the compressed (2048, 2048) triu mask"))
    _lengths_rules(node, op, ctx, out)
    if kw.get("block_table") is not None:
        kv_lengths = kw.get("actual_seq_lengths_kv") if op == "npu_fused_infer_attention_score" else lengths
        if kv_lengths is None:
            out.append(Finding("paged_lengths", "error", layer, name, "block_table without KV lengths",
                               "paged attention needs the KV lengths (actual_seq_lengths, or actual_seq_lengths_kv "
                               "in FIA) with block_table"))
        bs = kw.get("block_size", 0)
        align = 32 if ctx.kv_dtype == "int8" else 16
        if bs % align:
            out.append(Finding("block_size", "error", layer, name, bs, f"block_size must be a multiple of {align}"))
        q = meta_value(node.args[0])
        if op == "npu_fused_infer_attention_score" and q is not None and kw.get("input_layout") != "TND":
            qs = q.shape[1] if kw.get("input_layout", "BSH") in ("BSH", "BSND") else q.shape[2]
            if not (isinstance(qs, int) and qs == 1) and (bs % 128 or bs > 512):
                out.append(Finding("fia_block_size", "error", layer, name, bs,
                                   "FIA paged prefill (Q_S > 1, the prefix-cache extend graph) needs block_size a "
                                   "multiple of 128, at most 512: set kv_cache.block_size: 128"))
        table = meta_value(kw.get("block_table"))
        if table is not None and table.dtype != torch.int32:
            out.append(Finding("block_table_dtype", "error", layer, name, str(table.dtype), "pass block_table as int32"))


UNBOUNDED_TOKENS = (2147483647, 2147473647)  # the second: a typo some torch_npu releases ship as PFA's default


def _is_lowered(node: fx.Node) -> bool:
    return getattr(node.target, "namespace", None) == "npu"


def _lengths_rules(node: fx.Node, op: str, ctx: LintContext, out: list[Finding]) -> None:
    """Recompile traps and mask/band rules of one attention call (npu-ops.md section 3)."""
    layer, name, kw = layer_of(node), node.name, node.kwargs
    if op == "npu_prompt_flash_attention" and _is_lowered(node):
        for key in ("actual_seq_lengths", "actual_seq_lengths_kv"):
            value = kw.get(key)
            if value is not None and not (isinstance(value, (list, tuple)) and all(isinstance(x, int) for x in value)):
                out.append(Finding("pfa_varying_lengths", "error", layer, name, f"{key} = {value}",
                                   "PFA's lengths must be Python int constants fixed per prefill bucket: values "
                                   "that differ per step recompile the graph (or are rejected as tensors)"))
    if op in ("npu_incre_flash_attention", "npu_fused_infer_attention_score") and _is_lowered(node):
        key = "actual_seq_lengths" if op == "npu_incre_flash_attention" else "actual_seq_lengths_kv"
        value = kw.get(key)
        if kw.get("block_table") is not None and isinstance(value, (list, tuple)) and value and all(
                isinstance(x, int) for x in value):
            out.append(Finding("constant_decode_lengths", "error", layer, name, f"{key} = {list(value)[:4]}",
                               "decode KV lengths baked in as constants recompile at every step: pass them as a "
                               "SymInt list input (dynamic=True) rebuilt at every call"))
    sparse = kw.get("sparse_mode", 0)
    mask = kw.get("atten_mask")
    pre, nxt = kw.get("pre_tokens", 2147483647), kw.get("next_tokens", None)
    if sparse == 0 and mask is not None and op != "npu_incre_flash_attention":
        band_set = pre not in UNBOUNDED_TOKENS or (nxt is not None and nxt not in UNBOUNDED_TOKENS
                                                   and op == "npu_fused_infer_attention_score")
        if band_set:
            out.append(Finding("mask_band", "warning", layer, name, f"sparse_mode 0, pre_tokens={pre}, next_tokens={nxt}",
                               "in sparse_mode 0 the band only skips whole blocks while the mask applies element by "
                               "element: make them agree (or leave pre/next unbounded), else accuracy suffers"))
    if op == "npu_fused_infer_attention_score" and mask is not None and sparse in (0, 1):
        q = meta_value(node.args[0])
        layout = kw.get("input_layout", "BSH")
        qs = None if q is None else (q.shape[1] if layout in ("BSH", "BSND") else q.shape[2] if layout == "BNSD" else None)
        if not (isinstance(qs, int) and qs == 1) and kw.get("inner_precise", 0) not in (2, 3):
            out.append(Finding("fia_masked_rows", "warning", layer, name, f"inner_precise={kw.get('inner_precise', 0)}",
                               "a full atten_mask can mask every key of a query row; FIA then returns garbage for "
                               "that row unless inner_precise is 2 or 3 (Q_S > 1)"))


def _recipe_rules(graphs: list[fx.GraphModule], ctx: LintContext, out: list[Finding]) -> None:
    """Settings that are wrong before any graph runs (compile.torchair and the import order)."""
    import sys

    names = list(sys.modules)
    if "torchair" in names and ("torch_npu" not in names or names.index("torchair") < names.index("torch_npu")):
        out.append(Finding("import_order", "error", None, "process", "torchair imported before torch_npu",
                           "import torch_npu first: otherwise graph mode silently does not engage"))
    if ctx.torchair_mode is None:
        return
    if ctx.frozen_parameter:
        for gm in graphs:
            tensors = dict(gm.named_parameters(remove_duplicate=False))
            tensors.update(gm.named_buffers(remove_duplicate=False))
            for tname, t in tensors.items():
                if not t.is_contiguous():
                    out.append(Finding("frozen_parameter_layout", "error", layer_of_name(tname), tname,
                                       f"stride {tuple(t.stride())}",
                                       "frozen_parameter=True with a non-contiguous parameter gives wrong graph "
                                       "output: make it contiguous or set frozen_parameter: false"))
    if ctx.frozen_parameter and ctx.export_air:
        out.append(Finding("export_air_frozen", "error", None, "recipe", "export_air with frozen_parameter",
                           "torchair.dynamo_export does not support frozen_parameter: turn one off"))
    if ctx.export_air and ctx.torchair_mode != "max-autotune":
        out.append(Finding("export_air_mode", "error", None, "recipe", ctx.torchair_mode,
                           "offline .air export is a max-autotune (GE) feature: set mode: max-autotune"))
    if ctx.torchair_mode == "reduce-overhead":
        out.append(Finding("static_capture_lengths", "warning", None, "recipe", "mode reduce-overhead",
                           "reduce-overhead captures static shapes: SymInt decode lengths are rejected or recompile; "
                           "use max-autotune with tiling_schedule_optimize, or npugraph_ex"))
    if ctx.torchair_mode == "max-autotune" and not ctx.tiling_schedule_optimize:
        out.append(Finding("tiling_sink", "warning", None, "recipe", "tiling_schedule_optimize: false",
                           "decode lengths change every step: set tiling_schedule_optimize: true (tiling sink) so "
                           "the dynamic decode graph does not redo host tiling per step"))


def layer_of_name(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def _host_syncs(gm: fx.GraphModule, out: list[Finding]) -> None:
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (
            torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default,
        ):
            out.append(Finding("host_sync", "error", layer_of(node), node.name, str(node.target),
                               "no .item()/.tolist() inside the captured region: pass the value as an input"))


def lint(graphs: Iterable[fx.GraphModule], ctx: LintContext) -> LintReport:
    """Check canonical graphs (attention attributes) and paged graphs (NPU op arguments)."""
    report = LintReport()
    graphs = list(graphs)
    _recipe_rules(graphs, ctx, report.findings)
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is ATTENTION:
                report.checked_nodes += 1
                _canonical(node, ctx, report.findings)
            elif (op := _op_name(node)) is not None:
                report.checked_nodes += 1
                _paged(node, op, ctx, report.findings)
        _host_syncs(gm, report.findings)
    if ctx.block_size % (32 if ctx.kv_dtype == "int8" else 16):
        report.findings.append(Finding("block_size", "error", None, "recipe", ctx.block_size,
                                       "kv_cache.block_size must be a multiple of 16 (32 for int8 KV)"))
    if ctx.dtype not in NPU_DTYPES:
        report.findings.append(Finding("dtype", "error", None, "recipe", str(ctx.dtype).removeprefix("torch."),
                                       "the NPU attention ops run fp16/bf16 only; set dtype: bfloat16"))
    # One finding per (rule, layer, value) is enough: the same issue repeats in prefill and decode graphs.
    seen, unique = set(), []
    for f in report.findings:
        key = (f.rule, f.layer, str(f.value))
        if key not in seen:
            seen.add(key)
            unique.append(f)
    report.findings = unique
    return report
