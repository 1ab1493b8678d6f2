"""passes.lint on NPU targets: expressible configs pass in bf16/fp16; each rule and known trap
(npu-ops.md section 3) fails with a message naming the fix."""
import sys
import types

import pytest
import torch
import torch.fx as fx

import graphgen.ops
from graphgen.capture.export import capture
from graphgen.capture.interface import register
from graphgen.compiler import _example_inputs, kv_spec_for, paged_graph_module
from graphgen.passes.lint import LintContext, lint
from graphgen.passes.npu_lowering import npu_lowering
from graphgen.passes.paged_attention import plain_graph_module
from graphgen.recipe import Recipe, default_recipe

from models import available, build_tiny

graphgen.ops.emulate()
NPU_ARCHS = [a for a in ("llama", "qwen2", "mistral") if available(a)]


def _ctx(dtype=torch.bfloat16, **over):
    base = dict(target="npu", dtype=dtype, block_size=16, kv_dtype="auto", prefill="buckets", torchair_mode="max-autotune",
                tiling_schedule_optimize=True)
    return LintContext(**(base | over))


_PAGED: dict[str, tuple] = {}


def _paged(arch):
    """Canonical graph and paged programs (prefill/extend/decode, block_size 16) of a tiny `arch`,
    exported once per architecture (the graphs do not depend on the lint's dtype)."""
    if arch not in _PAGED:
        model = build_tiny(arch, attn_implementation=register())
        ep, _ = capture(model, max_batch=2, max_seq_len=32)
        recipe = Recipe.model_validate(default_recipe().normalized() | {
            "limits": {"max_model_len": 128, "max_num_seqs": 2, "max_num_batched_tokens": 128},
            "graphs": {"decode_batch_sizes": [1, 2], "prefill": "varlen"}})
        spec = kv_spec_for(recipe, model)
        paged = {}
        for phase in ("prefill", "extend", "decode") if arch == "llama" else ("prefill", "decode"):
            gm, _ = paged_graph_module(ep, phase, spec)
            ex, dims = _example_inputs(phase, spec, recipe, torch.device("cpu"))
            with torch.no_grad():
                paged[phase] = torch.export.export(gm, tuple(ex), dynamic_shapes=dims, strict=False)
        _PAGED[arch] = (ep.graph_module, paged)
    return _PAGED[arch]


def _lowered(arch, attention_ops="ifa_pfa", phases=("prefill", "decode")):
    canonical, paged = _paged(arch)
    return [canonical] + [npu_lowering(plain_graph_module(paged[p]), p, block_size=16, attention_ops=attention_ops,
                                       prefill_tokens=16)[0] for p in phases]


@pytest.fixture(scope="module")
def llama_graphs():
    return _lowered("llama")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", NPU_ARCHS)
def test_npu_expressible_architectures_pass(arch, dtype):
    report = lint(_lowered(arch), _ctx(dtype))
    assert report.npu_expressible, [f.line() for f in report.findings]
    assert report.checked_nodes >= 3 * 2  # canonical + prefill + decode attention, two layers


def test_fia_lowering_passes():
    report = lint(_lowered("llama", "fia"), _ctx(attention_ops="fia"))
    assert report.npu_expressible, [f.line() for f in report.findings]


def _rules(report):
    return {f.rule: f for f in report.findings}


def test_fp32_block_size_and_tiling_sink(llama_graphs):
    r = _rules(lint(llama_graphs, _ctx(torch.float32, block_size=24, tiling_schedule_optimize=False)))
    assert "bfloat16" in r["dtype"].fix and r["dtype"].severity == "error"
    assert "multiple of 16" in r["block_size"].fix
    assert "tiling_schedule_optimize: true" in r["tiling_sink"].fix


def test_misaligned_head_dim_without_padding():
    model = build_tiny("llama", attn_implementation=register(), head_dim=20, hidden_size=80)
    ep, _ = capture(model, max_batch=2, max_seq_len=32)
    r = _rules(lint([ep.graph_module], _ctx(head_dim_padding="reject")))
    assert r["head_dim"].severity == "error" and "head_dim_padding: pad" in r["head_dim"].fix
    assert lint([ep.graph_module], _ctx()).npu_expressible  # padding is exact


def _canonical_graph(n=4, nkv=2, d=16, **kwargs):
    g = fx.Graph()
    q, k, v = g.placeholder("q"), g.placeholder("k"), g.placeholder("v")
    q.meta["val"], k.meta["val"], v.meta["val"] = torch.empty(1, n, 8, d), torch.empty(1, nkv, 8, d), torch.empty(1, nkv, 8, d)
    sinks = g.placeholder("s") if kwargs.pop("sinks", False) else None
    node = g.call_function(torch.ops.graphgen.attention.default, (q, k, v),
                           {"layer_idx": 0, "scale": 0.25, "sinks": sinks, **kwargs})
    g.output(node)
    return fx.GraphModule(torch.nn.Module(), g)


@pytest.mark.parametrize("graph,rule,words", [
    (dict(n=130, nkv=2), "gqa_ratio", "ratio <= 64"),
    (dict(softcap=30.0), "softcap", "softcap"),
    (dict(sinks=True), "sinks", "sink"),
])
def test_canonical_rules(graph, rule, words):
    r = _rules(lint([_canonical_graph(**graph)], _ctx()))
    assert r[rule].severity == "error" and words in r[rule].fix and r[rule].layer == 0


def test_fia_prefill_block_size_must_be_128():
    extend = _lowered("llama", phases=("extend",))[1]
    r = _rules(lint([extend], _ctx()))
    assert "kv_cache.block_size: 128" in r["fia_block_size"].fix


def test_import_order_trap(monkeypatch, llama_graphs):
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    monkeypatch.setitem(sys.modules, "torchair", types.ModuleType("torchair"))
    r = _rules(lint(llama_graphs[:1], _ctx()))
    assert "import torch_npu first" in r["import_order"].fix


def test_recompile_prone_and_export_settings(llama_graphs):
    r = _rules(lint(llama_graphs[:1], _ctx(torchair_mode="reduce-overhead", export_air=True)))
    assert r["static_capture_lengths"].severity == "warning" and r["export_air_mode"].severity == "error"
    r = _rules(lint(llama_graphs[:1], _ctx(frozen_parameter=True, export_air=True)))
    assert "dynamo_export" in r["export_air_frozen"].fix


def test_frozen_parameter_with_non_contiguous_weight(llama_graphs):
    gm = _canonical_graph()
    gm.register_parameter("w", torch.nn.Parameter(torch.randn(4, 3).t()))
    r = _rules(lint([gm], _ctx(frozen_parameter=True)))
    assert r["frozen_parameter_layout"].severity == "error"
    assert "frozen_parameter_layout" not in _rules(lint([gm], _ctx()))


def _npu_call(op, kwargs, q_shape=(1, 4, 64)):
    g = fx.Graph()
    q, k, v = (g.placeholder(n) for n in "qkv")
    q.meta["val"] = torch.empty(q_shape)
    extra = {}
    for name in ("atten_mask", "block_table"):
        if kwargs.get(name) == "node":
            extra[name] = g.placeholder(name)
            extra[name].meta["val"] = torch.empty(2, 2, dtype=torch.int32 if name == "block_table" else torch.bool)
    node = g.call_function(getattr(torch.ops.npu, op).default, (q, k, v), {**kwargs, **extra})
    g.output(node)
    return fx.GraphModule(torch.nn.Module(), g)


def test_graph_traps_in_lowered_calls():
    decode_const = _npu_call("npu_incre_flash_attention", dict(actual_seq_lengths=[5, 7], block_table="node",
                                                                block_size=16, num_heads=4), q_shape=(2, 1, 64))
    assert "recompile at every step" in _rules(lint([decode_const], _ctx()))["constant_decode_lengths"].fix
    band = _npu_call("npu_prompt_flash_attention", dict(atten_mask="node", pre_tokens=3, sparse_mode=0,
                                                        actual_seq_lengths=[4], actual_seq_lengths_kv=[4]))
    assert "agree" in _rules(lint([band], _ctx()))["mask_band"].fix
    rows = _npu_call("npu_fused_infer_attention_score", dict(atten_mask="node", sparse_mode=0, inner_precise=0))
    assert "inner_precise is 2 or 3" in _rules(lint([rows], _ctx()))["fia_masked_rows"].fix
    ok = _npu_call("npu_fused_infer_attention_score", dict(atten_mask="node", sparse_mode=0, inner_precise=2))
    assert "fia_masked_rows" not in _rules(lint([ok], _ctx()))


def test_pfa_lengths_must_be_constants(llama_graphs):
    prefill = llama_graphs[1]
    node = next(n for n in prefill.graph.nodes if n.op == "call_function"
                and n.target is torch.ops.npu.npu_prompt_flash_attention.default)
    assert node.kwargs["actual_seq_lengths"] == [16]
    assert "pfa_varying_lengths" not in _rules(lint([prefill], _ctx()))
    # lengths as a graph value (a per-step input) instead of constants
    bad = _npu_call("npu_prompt_flash_attention", dict(block_table="node"))
    call = next(n for n in bad.graph.nodes if n.op == "call_function")
    call.kwargs = {**{k: v for k, v in call.kwargs.items() if k != "block_table"},
                   "actual_seq_lengths": call.kwargs["block_table"]}
    assert "fixed per prefill bucket" in _rules(lint([bad], _ctx()))["pfa_varying_lengths"].fix


def test_host_sync_in_graph():
    g = fx.Graph()  # what .item()/.tolist() leave in a captured graph
    x = g.placeholder("x")
    s = g.call_function(torch.ops.aten._local_scalar_dense.default, (x,))
    g.output(s)
    r = _rules(lint([fx.GraphModule(torch.nn.Module(), g)], _ctx()))
    assert ".item()/.tolist()" in r["host_sync"].fix
