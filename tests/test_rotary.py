"""The rotary-table pass (graphgen/passes/rotary.py): position-only cos/sin become table lookups."""
import pytest
import torch

from graphgen.compiler import kv_spec_for, paged_graph_module
from graphgen.passes.rotary import tabulate_rotary

TRIG = (torch.ops.aten.cos.default, torch.ops.aten.sin.default)


class Rope(torch.nn.Module):
    """cos/sin of the positions times inverse frequencies (HF's rotary embedding, reduced), or a
    variant whose angles also depend on the positions' maximum or on x."""

    def __init__(self, angles: str = "positions"):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8), persistent=False)
        self.angles = angles

    def forward(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq
        if self.angles == "scaled by the longest":
            freqs = freqs / (position_ids.max() + 1).float()
        elif self.angles == "shifted by x":
            freqs = freqs + x[..., :1]
        elif self.angles == "with noise":
            freqs = freqs + torch.rand_like(freqs)
        emb = torch.cat((freqs, freqs), dim=-1)
        return x * emb.cos() + x.flip(-1) * emb.sin()


def _graph(module: torch.nn.Module):
    batch, seq = torch.export.Dim("batch", max=8), torch.export.Dim("seq", max=64)
    x, pos = torch.randn(2, 5, 8), torch.arange(5).repeat(2, 1)
    ep = torch.export.export(module, (x, pos), dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}))
    return ep.module(check_guards=False)


def _trig(gm) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in TRIG]


def test_position_only_cos_and_sin_become_lookups_with_the_same_values():
    gm = _graph(Rope())
    x, pos = torch.randn(3, 7, 8), torch.randint(0, 100, (3, 7))
    before = gm(x, pos)
    record = tabulate_rotary(gm, 100)
    assert len(record.tabulated) == 2 and not record.skipped
    assert not _trig(gm)
    lookups = [n for n in gm.graph.nodes if n.target is torch.ops.aten.embedding.default]
    assert len(lookups) == 2 and all(n.args[1].name == "position_ids" for n in lookups)
    assert gm.graphgen_rotary_table_0.shape == (100, 8)
    torch.testing.assert_close(gm(x, pos), before, atol=0, rtol=0)
    with pytest.raises(IndexError):  # past the table: an error, never a silent wrong angle
        gm(x, torch.full((3, 7), 100))


@pytest.mark.parametrize("angles, why", [("scaled by the longest", "depends on the other positions"),
                                         ("shifted by x", "inputs other than position_ids"),
                                         ("with noise", "draws random numbers")])
def test_cos_and_sin_that_need_more_than_their_position_stay(angles, why):
    gm = _graph(Rope(angles))
    record = tabulate_rotary(gm, 100)
    assert not record.tabulated and len(record.skipped) == 2
    assert all(why in line for line in record.skipped)
    assert len(_trig(gm)) == 2


def test_a_graph_without_positions_is_left_alone():
    class NoPositions(torch.nn.Module):
        def forward(self, x):
            return x.cos()

    gm = torch.export.export(NoPositions(), (torch.randn(4),)).module()
    record = tabulate_rotary(gm, 16)
    assert not record.tabulated and "no position_ids input" in record.skipped[0]
    with pytest.raises(ValueError, match="num_positions"):
        tabulate_rotary(gm, 0)


def test_tables_of_the_tiny_model_are_its_rotary_embedding(tiny_captured):
    """On the captured tiny Llama's decode graph: both tables hold what HF's rotary embedding
    computes for every position, and the graph keeps no cos/sin."""
    recipe, model, ep, _ = tiny_captured
    gm, _ = paged_graph_module(ep, "decode", kv_spec_for(recipe, model))
    record = tabulate_rotary(gm, 256)
    assert len(record.tabulated) == 2 and not _trig(gm)
    positions = torch.arange(256)[None]
    cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
    torch.testing.assert_close(gm.graphgen_rotary_table_0, cos[0], atol=0, rtol=0)
    torch.testing.assert_close(gm.graphgen_rotary_table_1, sin[0], atol=0, rtol=0)
