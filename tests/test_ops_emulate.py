"""emulate(): torch.ops.npu.* mirrors of every op in NPU_SCHEMAS with identical schemas, kernels and
fake kernels forwarding to graphgen, autograd for the training op, idempotency, the torch_npu-like
module, and deference to a real torch_npu."""
from __future__ import annotations

import sys
import types

import pytest
import torch

import graphgen.ops  # noqa: F401
from graphgen.ops import _registry, emulate


def test_every_npu_schema_is_mirrored_identically():
    torch_npu = emulate()
    assert _registry.NPU_SCHEMAS, "graphgen.ops registered no npu ops"
    for name in _registry.NPU_SCHEMAS:
        base = name.partition(".")[0]
        npu_schema = str(getattr(torch.ops.npu, base).default._schema)
        graphgen_schema = str(getattr(torch.ops.graphgen, base).default._schema)
        assert npu_schema == graphgen_schema.replace("graphgen::", "npu::", 1)
        assert callable(getattr(torch_npu, base))
    for api in ("npu_incre_flash_attention", "npu_prompt_flash_attention", "npu_fused_infer_attention_score",
                "npu_fusion_attention", "npu_advance_step_flashattn", "npu_scatter_nd_update_", "scatter_update_"):
        assert hasattr(torch_npu, api), api


def test_idempotent_and_picks_up_ops_registered_later():
    first = emulate()
    name = "_graphgen_emulate_probe"
    _registry.define(name, "(Tensor x) -> Tensor")
    torch.library.impl(f"graphgen::{name}", "CompositeExplicitAutograd")(lambda x: x * 3)
    torch.library.register_fake(f"graphgen::{name}")(lambda x: torch.empty_like(x))
    try:
        second = emulate()
        assert second is first
        assert torch.equal(second._graphgen_emulate_probe(torch.ones(2)), torch.full((2,), 3.0))
        assert emulate() is first  # a third call defines nothing twice
    finally:
        del _registry.NPU_SCHEMAS[name]


def test_module_functions_match_graphgen_ops():
    torch_npu = emulate()
    q, k, v = torch.randn(2, 4, 16), torch.randn(2, 6, 16), torch.randn(2, 6, 16)
    got = torch_npu.npu_fusion_attention(q, k, v, 2, "BSH", scale=0.25)
    want = torch.ops.graphgen.npu_fusion_attention(q, k, v, 2, "BSH", scale=0.25)
    torch.testing.assert_close(got[0], want[0])
    assert got[4:] == want[4:]

    cache = torch.zeros(3, 4, 8)
    out = torch_npu.npu_scatter_nd_update_(cache, torch.tensor([[1, 2]]), torch.ones(1, 8))
    assert out is cache and cache[1, 2].sum() == 8
    data = torch.zeros(1, 2, 4, 4)
    torch_npu.scatter_update_(data, torch.tensor([3]), torch.ones(1, 2, 1, 4), -2)
    assert data[0, :, 3].sum() == 8

    tokens, pos, lens, slots = (torch.zeros(3, dtype=torch.int64) for _ in range(4))
    lens += torch.tensor([5, 6, 7])
    assert torch_npu.npu_advance_step_flashattn(tokens, torch.tensor([[9], [8]]), pos, lens, slots,
                                                torch.tensor([[4, 5], [6, 7], [0, 0]]), 3, 2, 4) is None
    assert tokens.tolist() == [9, 8, 0] and lens.tolist() == [6, 7, 7] and slots.tolist() == [21, 30, 0]  # 5*4+1, 7*4+2


def test_training_op_gradients_flow_through_npu_op():
    torch_npu = emulate()
    leaves = [torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    sink = torch.randn(2, dtype=torch.float64, requires_grad=True)
    out = torch_npu.npu_fusion_attention(*leaves, 2, "BNSD", sink=sink, scale=0.5)[0]
    got = torch.autograd.grad(out.sum(), leaves + [sink])
    ref = torch.ops.graphgen.npu_fusion_attention(*leaves, 2, "BNSD", sink=sink, scale=0.5)[0]
    want = torch.autograd.grad(ref.sum(), leaves + [sink])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_npu_node_stays_opaque_in_exported_graph():
    torch_npu = emulate()

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return torch_npu.npu_fusion_attention(q, k, v, 2, "BNSD", scale=0.5)[0] * 2

    args = (torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8))
    ep = torch.export.export(M(), args, strict=False)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "npu.npu_fusion_attention.default" in targets
    assert not any(t.startswith("graphgen.") for t in targets)
    torch.testing.assert_close(ep.module()(*args), M()(*args))


def test_real_torch_npu_is_returned_untouched(monkeypatch):
    fake_real = types.ModuleType("torch_npu")
    monkeypatch.setitem(sys.modules, "torch_npu", fake_real)
    with pytest.warns(UserWarning, match="torch_npu is installed"):
        assert emulate() is fake_real
