"""The sampled-rows pass (graphgen/passes/sampled_rows.py): the logits' row gather moves up to the last
layer's attention, so rows that do not sample skip the last layer's output projection and MLP."""
import pytest
import torch

from graphgen.compiler import kv_spec_for, paged_graph_module
from graphgen.passes.paged_attention import plain_graph_module
from graphgen.passes.sampled_rows import GATHER, gather_sampled_rows_early
from graphgen.passes.subgraph import ancestors

H = 16


class Layer(torch.nn.Module):
    """A last decoder layer, reduced: rows mixed by a causal running mean (the attention's place),
    a residual, RMS norms, a gated MLP, the gather of the sampled rows and an LM head."""

    def __init__(self, returns_hidden: bool = False, pool_rows: bool = False):
        super().__init__()
        self.o, self.gate, self.up = (torch.nn.Linear(H, H, bias=False) for _ in range(3))
        self.down, self.head = torch.nn.Linear(H, H, bias=False), torch.nn.Linear(H, 32, bias=False)
        self.norm, self.final_norm = torch.nn.Parameter(torch.rand(H)), torch.nn.Parameter(torch.rand(H))
        self.returns_hidden, self.pool_rows = returns_hidden, pool_rows

    @staticmethod
    def rms(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    def forward(self, x, logits_indices):
        mixed = x.cumsum(1) / torch.arange(1, x.shape[1] + 1, dtype=x.dtype)[:, None]
        h = x + self.o(mixed)
        if self.pool_rows:  # every row reads all rows: the gather cannot move above this
            h = h - h.mean(1, keepdim=True)
        n = self.rms(h, self.norm)
        h = h + self.down(torch.nn.functional.silu(self.gate(n)) * self.up(n))
        hidden = self.rms(h, self.final_norm)
        logits = self.head(hidden.index_select(1, logits_indices))
        return (logits, hidden) if self.returns_hidden else logits


def _graph(module: torch.nn.Module):
    seq, picked = torch.export.Dim("seq", min=2, max=64), torch.export.Dim("picked", min=2, max=64)
    ep = torch.export.export(module, (torch.randn(1, 9, H), torch.tensor([3, 8])),
                             dynamic_shapes=({1: seq}, {0: picked}))
    return plain_graph_module(ep)


def _linears_on_gathered_rows(gm) -> set[str]:
    """The weights of the linears that read gathered rows (an index_select among their inputs)."""
    out = set()
    for node in gm.graph.nodes:
        if node.target is torch.ops.aten.linear.default and any(a.target is GATHER for a in ancestors(node.args[0])):
            out.add(node.args[1].target)
    return out


def test_gather_moves_to_the_mixing_op_and_the_residual_with_the_same_logits():
    torch.manual_seed(0)
    module = Layer().eval()
    gm = _graph(module)
    x, idx = torch.randn(1, 23, H), torch.tensor([4, 11, 22])
    before = gm(x, idx)
    record = gather_sampled_rows_early(gm)
    gathered = {n.args[0].target: n.args[1] for n in gm.graph.nodes if n.target is GATHER}
    # the running sums, their divisors (T, 1) (broadcast against (1, T, H): rows along dim 0) and the residual x
    assert gathered == {torch.ops.aten.cumsum.default: 1, torch.ops.aten.unsqueeze.default: 0, "x": 1}
    assert _linears_on_gathered_rows(gm) == {"o.weight", "gate.weight", "up.weight", "down.weight", "head.weight"}
    assert sorted(record.gathers) == sorted(n.args[0].name for n in gm.graph.nodes if n.target is GATHER)
    # the same values, up to how a matmul rounds for a different number of rows
    torch.testing.assert_close(gm(x, idx), before, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gm(x, idx), module(x, idx), rtol=1e-5, atol=1e-6)
    assert not gather_sampled_rows_early(gm).moved  # nothing more to move


def test_gather_stays_below_values_other_outputs_read():
    torch.manual_seed(0)
    gm = _graph(Layer(returns_hidden=True).eval())
    x, idx = torch.randn(1, 12, H), torch.tensor([0, 11])
    logits, hidden = gm(x, idx)
    record = gather_sampled_rows_early(gm)
    assert not record.moved and _linears_on_gathered_rows(gm) == {"head.weight"}
    new_logits, new_hidden = gm(x, idx)
    torch.testing.assert_close(new_logits, logits, rtol=0, atol=0)
    assert new_hidden.shape == hidden.shape


def test_gather_stops_at_a_reduction_over_the_rows():
    torch.manual_seed(0)
    gm = _graph(Layer(pool_rows=True).eval())
    x, idx = torch.randn(1, 10, H), torch.tensor([2, 9])
    before = gm(x, idx)
    record = gather_sampled_rows_early(gm)
    assert record.moved and _linears_on_gathered_rows(gm) == {"gate.weight", "up.weight", "down.weight", "head.weight"}
    torch.testing.assert_close(gm(x, idx), before, rtol=1e-5, atol=1e-6)


def test_graph_without_the_indices_input_is_left_alone():
    gm = _graph(Layer().eval())
    assert not gather_sampled_rows_early(gm, indices="no_such_input").moved


@pytest.fixture(scope="module")
def tiny_graphs(tiny_captured):
    recipe, model, ep, _ = tiny_captured
    spec = kv_spec_for(recipe, model)
    return spec, {phase: paged_graph_module(ep, phase, spec)[0] for phase in ("prefill", "mixed", "decode")}


@pytest.mark.parametrize("phase", ["prefill", "mixed"])
def test_only_the_last_layer_after_its_attention_runs_the_sampled_rows(tiny_graphs, phase):
    """Checked against HF eager by test_compile; here: which projections read only the sampled rows."""
    spec, graphs = tiny_graphs
    last = f"model.model.layers.{spec.num_layers - 1}."
    want = {last + "self_attn.o_proj.weight", last + "mlp.gate_proj.weight", last + "mlp.up_proj.weight",
            last + "mlp.down_proj.weight", "model.lm_head.weight"}
    assert _linears_on_gathered_rows(graphs[phase]) == want


def test_decode_has_no_gather(tiny_graphs):
    _, graphs = tiny_graphs
    assert not [n for n in graphs["decode"].graph.nodes if n.target is GATHER]
