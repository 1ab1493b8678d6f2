"""The serving decompositions the inductor backend inlines into the graph AOTInductor traces
(graphgen/ops/decompositions.py): what they replace, what they leave alone, and that the
replacement computes what the op it replaces computes."""
from __future__ import annotations

import pytest
import torch

import graphgen.ops  # noqa: F401
from graphgen.ops import cpu_kernels
from graphgen.ops.decompositions import inline_serving_forms, onednn_linear_available, serving_decompositions
from tests.naive import page_kv

ifa = torch.ops.graphgen.npu_incre_flash_attention
pfa = torch.ops.graphgen.npu_prompt_flash_attention
fia = torch.ops.graphgen.npu_fused_infer_attention_score


def _targets(ep) -> list[str]:
    return [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]


def _serving(ep, calls: int, dynamic_shapes=None):
    """The serving forms as the inductor backend applies them (inlined into the unlifted module,
    which the next trace, here torch.export's, traces through); `calls` of the table's ops."""
    gm = ep.module(check_guards=False)
    assert inline_serving_forms(gm) == calls
    args, kwargs = ep.example_inputs
    return torch.export.export(gm, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(32, 64, bias=False)
        self.down = torch.nn.Linear(64, 16)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.mark.skipif(not onednn_linear_available(), reason="torch built without oneDNN")
def test_fp32_cpu_linear_becomes_the_gemv_kernel_and_computes_the_same():
    torch.manual_seed(0)
    m = _MLP()
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(m, (torch.randn(2, 3, 32),), dynamic_shapes=({0: batch},))
    decomposed = _serving(ep, 2, dynamic_shapes=({0: batch},))
    targets = _targets(decomposed)
    replacement = "graphgen.gemv_linear.default" if cpu_kernels.available() else "mkldnn._linear_pointwise.default"
    assert targets.count(replacement) == 2
    assert not any(t.startswith("aten.linear") or t.startswith("aten.mm") or t.startswith("aten.addmm")
                   for t in targets)
    for b in (1, 5):
        x = torch.randn(b, 3, 32)
        torch.testing.assert_close(decomposed.module()(x), m(x), rtol=1e-5, atol=1e-5)


def test_bf16_cpu_linear_becomes_the_gemv_kernel_too():
    torch.manual_seed(0)
    m = _MLP().to(torch.bfloat16)
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    decomposed = _serving(torch.export.export(m, (x,)), 2)
    targets = _targets(decomposed)
    if cpu_kernels.available():
        assert targets.count("graphgen.gemv_linear.default") == 2
    else:  # oneDNN's linear refuses plain bf16 weights without AVX512-BF16: ATen's stays
        assert targets.count("aten.linear.default") == 2
    # fp32 accumulation rounded once per output, as ATen's bf16 linear: at most a bf16 step apart
    torch.testing.assert_close(decomposed.module()(x), m(x), rtol=2e-2, atol=2e-2)


class _Siblings(torch.nn.Module):
    """A layer's sibling linears: q, k, v read one x, gate and up another (silu(gate) * up: one gated
    call); four heads read a third (grouped 2 + 2); o has a bias and down reads its own x (both stay
    single linears)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(32, n, bias=False) for n in (32, 16, 16))
        self.o = torch.nn.Linear(64, 32)
        self.gate, self.up = (torch.nn.Linear(32, 48, bias=False) for _ in range(2))
        self.down = torch.nn.Linear(48, 32, bias=False)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(32, 8, bias=False) for _ in range(4))

    def forward(self, x):
        a = self.o(torch.cat([self.q(x), self.k(x), self.v(x)], -1))
        h = self.down(torch.nn.functional.silu(self.gate(a)) * self.up(a))
        return torch.cat([head(h) for head in self.heads], -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sibling_linears_run_as_one_call_and_compute_the_same(dtype):
    torch.manual_seed(0)
    m = _Siblings().to(dtype)
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(m, (torch.randn(3, 32, dtype=dtype),), dynamic_shapes=({0: batch},))
    decomposed = _serving(ep, 11, dynamic_shapes=({0: batch},))
    targets = _targets(decomposed)
    if cpu_kernels.available():
        assert targets.count("graphgen.gemv_linear3.default") == 1  # q, k, v
        assert targets.count("graphgen.gemv_gated.default") == 1  # silu(gate) * up
        assert targets.count("graphgen.gemv_linear2.default") == 2  # the heads as 2 + 2
        assert targets.count("graphgen.gemv_linear.default") == 2  # o (its bias added after), down
        assert "aten.silu.default" not in targets
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for b in (1, 5, 20):
        x = torch.randn(b, 32, dtype=dtype)
        torch.testing.assert_close(decomposed.module()(x), m(x), **tol)


class _GatedVariants(torch.nn.Module):
    """Products that are not silu(gate) * up of one grouped pair alone stay as they are: up * silu(gate)
    (operands swapped) is fused; a gate read elsewhere too, and gelu in place of silu, are not."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.ModuleList(torch.nn.Linear(16, 24, bias=False) for _ in range(6))

    def forward(self, x):
        swapped = self.lin[1](x) * torch.nn.functional.silu(self.lin[0](x))
        gate = self.lin[2](swapped[..., :16])
        shared = torch.nn.functional.silu(gate) * self.lin[3](swapped[..., :16]) + gate
        gelu = torch.nn.functional.gelu(self.lin[4](x)) * self.lin[5](x)
        return shared, gelu


def test_only_silu_times_up_of_one_pair_becomes_the_gated_call():
    from graphgen.ops.decompositions import fuse_gated_mlps, group_sibling_linears

    torch.manual_seed(0)
    m = _GatedVariants()
    x = torch.randn(5, 16)
    gm = torch.export.export(m, (x,)).module(check_guards=False)
    group_sibling_linears(gm)
    assert fuse_gated_mlps(gm) == 1
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.aten.silu.default) == 1  # the shared gate's
    for got, want in zip(gm(x), m(x)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_sibling_weights_read_after_the_first_linear_move_up_to_it():
    """A weight's get_attr after the first sibling (graphs are not always laid out with every
    parameter read first) moves up to the grouped call; a computed weight keeps the linears apart."""
    from graphgen.ops.decompositions import group_sibling_linears

    linear = torch.ops.aten.linear.default
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    wq = graph.get_attr("wq")
    q = graph.call_function(linear, (x, wq))
    wk = graph.get_attr("wk")  # read after q's linear
    k = graph.call_function(linear, (x, wk))
    wv = graph.call_function(torch.ops.aten.mul.Tensor, (graph.get_attr("wv"), 2.0))  # computed
    v = graph.call_function(linear, (x, wv))
    graph.output((q, k, v))
    root = torch.nn.Module()
    for name in ("wq", "wk", "wv"):
        setattr(root, name, torch.nn.Parameter(torch.randn(8, 16)))
    gm = torch.fx.GraphModule(root, graph)
    xt = torch.randn(3, 16)
    before = gm(xt)
    assert group_sibling_linears(gm) == 2  # q and k; v's weight is computed after q's linear
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(linear) == 1
    for got, want in zip(gm(xt), before):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("layout", ["BSH", "BNSD"])
def test_paged_decode_ifa_call_is_replaced_by_aten_with_the_same_result(layout):
    torch.manual_seed(0)
    b, n, nkv, d, bs, skv = 3, 4, 2, 16, 16, 37
    gen = torch.Generator().manual_seed(1)
    k, v = torch.randn(b, nkv, skv, d), torch.randn(b, nkv, skv, d)
    key, table = page_kv(k, bs, layout == "BNSD", gen)
    value = torch.randn_like(key)
    q = torch.randn(b, 1, n * d) if layout == "BSH" else torch.randn(b, n, 1, d)
    lens = torch.tensor([37, 1, 0], dtype=torch.int64)  # a row with nothing visible gives zeros
    kw = dict(num_heads=n, scale_value=d ** -0.5, input_layout=layout, num_key_value_heads=nkv,
              block_table=table, block_size=bs)

    class Decode(torch.nn.Module):
        def forward(self, q, key, value, table, lens):
            return ifa.tensor_lengths(q, key, value, actual_seq_lengths=lens, **{**kw, "block_table": table})

    args = (q, key, value, table, lens)
    decomposed = _serving(torch.export.export(Decode(), args), 1)
    graphgen_ops = [t for t in _targets(decomposed) if "graphgen" in t]
    assert graphgen_ops == (["graphgen.paged_decode_attention.default"] if cpu_kernels.available() else [])
    expected = Decode()(*args)
    torch.testing.assert_close(decomposed.module()(*args), expected, rtol=1e-5, atol=1e-5)
    assert expected.reshape(b, -1)[2].abs().max() == 0


@pytest.mark.parametrize("sparse_mode,pre_tokens", [(3, 2147483647), (4, 2)])
def test_packed_causal_pfa_call_is_replaced_with_the_same_result(sparse_mode, pre_tokens):
    """Causal (mode 3): graphgen's per-sequence kernel where it is built; a band (mode 4 with
    pre_tokens) and builds without the kernels: one masked ATen attention."""
    torch.manual_seed(0)
    n, nkv, d, t = 4, 2, 16, 11
    q, k, v = torch.randn(t, n, d), torch.randn(t, nkv, d), torch.randn(t, nkv, d)
    ends = torch.tensor([4, 9], dtype=torch.int64)  # two sequences, then two tokens past the last end
    mask = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)

    class Prefill(torch.nn.Module):
        def forward(self, q, k, v, ends, mask):
            return pfa.tensor_lengths(q, k, v, atten_mask=mask, actual_seq_lengths=ends, actual_seq_lengths_kv=ends,
                                      num_heads=n, num_key_value_heads=nkv, scale_value=d ** -0.5,
                                      input_layout="TND", sparse_mode=sparse_mode, pre_tokens=pre_tokens,
                                      next_tokens=0)

    args = (q, k, v, ends, mask)
    decomposed = _serving(torch.export.export(Prefill(), args), 1)
    kernel = cpu_kernels.available() and sparse_mode == 3
    graphgen_ops = [t for t in _targets(decomposed) if "graphgen" in t]
    assert graphgen_ops == (["graphgen.packed_causal_attention.default"] if kernel else [])
    torch.testing.assert_close(decomposed.module()(*args), Prefill()(*args), rtol=1e-5, atol=1e-5)


def test_paged_tnd_fia_call_becomes_one_paged_decode_row_per_token():
    """The mixed graph's call: three sequences' new tokens (a 5-token chunk over a 15-token prefix,
    a decode row, a whole 3-token prompt) packed over a BSH pool, then a token past the last end."""
    torch.manual_seed(0)
    n, nkv, d, bs = 4, 2, 16, 16
    gen = torch.Generator().manual_seed(2)
    k = torch.randn(3, nkv, 40, d)
    key, table = page_kv(k, bs, False, gen)
    value = torch.randn_like(key)
    q = torch.randn(10, n, d)
    ends, kv_lens = torch.tensor([5, 6, 9]), torch.tensor([20, 33, 3])
    mask = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)

    class Mixed(torch.nn.Module):
        def forward(self, q, key, value, ends, table, kv_lens, mask):
            return fia.tensor_lengths(q, key, value, atten_mask=mask, actual_seq_lengths=ends,
                                      actual_seq_lengths_kv=kv_lens, block_table=table, num_heads=n,
                                      num_key_value_heads=nkv, scale=d ** -0.5, next_tokens=0,
                                      input_layout="TND", sparse_mode=3, block_size=bs)[0]

    args = (q, key, value, ends, table, kv_lens, mask)
    decomposed = _serving(torch.export.export(Mixed(), args), 1)
    graphgen_ops = [t for t in _targets(decomposed) if "graphgen" in t]
    assert graphgen_ops == (["graphgen.paged_decode_attention.default"] if cpu_kernels.available()
                            else ["graphgen.npu_fused_infer_attention_score.tensor_lengths"])
    expected = Mixed()(*args)
    torch.testing.assert_close(decomposed.module()(*args), expected, rtol=1e-5, atol=1e-5)
    assert expected[9].abs().max() == 0


def test_calls_outside_the_serving_forms_stay_reference_kernel_calls():
    n, d, t = 2, 16, 6
    q, k, v = torch.randn(t, n, d), torch.randn(t, n, d), torch.randn(t, n, d)
    ends = torch.tensor([6], dtype=torch.int64)
    mask = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)

    class Prefill(torch.nn.Module):  # sparse_mode 2 is not a serving form
        def forward(self, q, k, v, ends, mask):
            return pfa.tensor_lengths(q, k, v, atten_mask=mask, actual_seq_lengths=ends, actual_seq_lengths_kv=ends,
                                      num_heads=n, scale_value=d ** -0.5, input_layout="TND", sparse_mode=2)

    targets = _targets(_serving(torch.export.export(Prefill(), (q, k, v, ends, mask)), 1))
    assert any("npu_prompt_flash_attention" in t for t in targets)


def test_run_decompositions_with_the_table_gives_the_same_graph_as_the_inlined_forms():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32)
    ep = torch.export.export(_MLP(), (x,))
    assert _targets(ep.run_decompositions(serving_decompositions())) == _targets(_serving(ep, 2))
