"""graphgen::greedy_head (the runtime's greedy argmax over an fp32 LM head), the pass that leaves the
head to the runtime, and the runtime's greedy steps through it."""
import json
import shutil

import pytest
import torch
import yaml

from graphgen.artifact import read_manifest
from graphgen.ops import greedy_head as gh
from graphgen.passes.lm_head import split_lm_head
from graphgen.recipe import Recipe, RecipeError, default_recipe
from graphgen.runtime.engine import LLM
from graphgen.runtime.params import SamplingParams

needs_kernel = pytest.mark.skipif(not gh.supported(), reason="greedy_head needs a CPU with AVX512-VNNI")


def _greedy(x, w):
    packed, rows = gh.pack_head(w)
    return torch.ops.graphgen.greedy_head(x, w, packed, rows)


@needs_kernel
@pytest.mark.parametrize("vocab,hidden,rows", [(1000, 64, 1), (97, 130, 9), (4801, 33, 20), (48, 768, 16), (5, 7, 3)])
def test_greedy_head_is_the_argmax_of_the_logits(vocab, hidden, rows):
    w = torch.randn(vocab, hidden) * 0.05
    x = torch.randn(rows, hidden)
    tokens = _greedy(x, w)
    assert tokens.dtype == torch.int64 and tokens.shape == (rows,)
    assert torch.equal(tokens, (x.double() @ w.double().T).argmax(dim=1))  # no near-ties in random data


@needs_kernel
@pytest.mark.parametrize("vocab,hidden,rows", [(5000, 64, 8), (97, 130, 9), (32000, 768, 3)])
def test_bf16_head_is_the_argmax_of_the_rounded_logits(vocab, hidden, rows):
    """bf16 logits are fp32 sums rounded to bf16, as gemv_linear returns them: rounding makes ties, which
    go to the lowest id."""
    w = (torch.randn(vocab, hidden) * 0.05).bfloat16()
    w[vocab // 2] = w[vocab // 3]  # equal rows: equal logits
    x = torch.randn(rows, hidden).bfloat16()
    x[0] = w[vocab // 3]  # row 0 is largest on those two rows: a tie, the lower id wins
    tokens = _greedy(x, w)
    assert tokens[0] == vocab // 3
    assert torch.equal(tokens, torch.ops.graphgen.gemv_linear(x, w).float().argmax(dim=-1))


@needs_kernel
def test_greedy_head_is_exact_where_the_approximation_cannot_tell_ids_apart():
    """Ids whose logits differ by less than int8 resolves: the exact fp32 pass decides, ties to the lowest id."""
    hidden = 64
    w = torch.randn(300, hidden) * 0.01
    x = torch.ones(3, hidden)
    w[[40, 7, 200]] = 0.5  # logit 32 for all three: a tie, the lowest id (7) wins
    w[250] = 0.5
    w[250, 0] = 0.5 + 2 ** -12  # 32 + 2^-12 exactly: the same int8 row, wins in fp32
    x[1, 0] = 0.0  # row 1: w[250]'s extra weight meets a zero, so 7 ties with it and wins
    x[2] = -x[2]  # row 2: those ids are now the lowest logits; the argmax is among the random rows
    tokens = _greedy(x, w)
    assert tokens[0] == 250 and tokens[1] == 7
    assert tokens[2] == (x[2:] @ w.T).argmax(dim=1)[0]


@needs_kernel
def test_greedy_head_rows_that_are_not_finite_run_every_logit():
    w = torch.randn(500, 40)
    x = torch.randn(4, 40)
    x[1, 3] = float("nan")  # every logit NaN: the first id, as torch's argmax
    x[2, 5] = float("inf")  # +-inf by the sign of w[:, 5]: the first +inf
    x[3] *= 1e30  # large but finite: the bound scales with it
    tokens = _greedy(x, w)
    assert tokens[1] == 0
    assert tokens[2] == int(torch.nonzero(w[:, 5] > 0)[0])
    assert tokens[0] == (x[:1] @ w.T).argmax() and tokens[3] == (x[3:].double() @ w.double().T).argmax()
    assert _greedy(torch.zeros(2, 40), w).tolist() == [0, 0]  # every logit 0: the first id
    huge = torch.randn(1, 40).sign() * 1e37  # its l1 norm overflows fp32 (the logits do not): every logit exactly
    assert _greedy(huge, w)[0] == (huge.double() @ w.double().T).argmax()


def test_pack_head_layout_and_row_data():
    w = torch.randn(50, 5)
    packed, rows = gh.pack_head(w)
    assert packed.shape == gh.packed_shape(50, 5) == (6, 2, 16, 4) and packed.dtype == torch.int8
    scale = w.abs().amax(dim=1) / 127
    q = (w / scale[:, None]).round()
    assert packed[1, 1, 3, 0] == q[19, 4]  # id 16 + 3, columns 4-7 (5-7: padding)
    assert not packed[1, 1, 3, 1:].any() and not packed[3, :, 2:].any() and not packed[4:].any()
    assert int(q.abs().max()) == 127 and torch.equal(packed[0, 0, :, 0].float(), q[:16, 0])
    assert torch.equal(rows[0, :50], scale) and torch.equal(rows[2, :50], q.sum(dim=1))
    assert bool((rows[1, :50].double() >= scale.double() * q.abs().sum(dim=1).double()).all())
    assert not rows[:, 50:].any()
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="not finite"):
            gh.pack_head(torch.tensor([[1.0, 2.0], [1.0, bad]]))


def test_split_lm_head_returns_the_rows_the_head_reads(tiny_captured):
    from graphgen.compiler import kv_spec_for, paged_graph_module

    recipe, model, ep, _ = tiny_captured
    gm, _ = paged_graph_module(ep, "decode", kv_spec_for(recipe, model))
    assert split_lm_head(gm) is None  # the tiny head (384 x 64) stays in the graph by default
    head = split_lm_head(gm, min_elements=0)
    assert head is not None and head.endswith("lm_head.weight")
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert out.target is torch.ops.aten.select.int
    assert not any(n.target is torch.ops.aten.linear.default and n.args[1].target == head for n in gm.graph.nodes
                   if n.op == "call_function")
    assert split_lm_head(gm, min_elements=0) is None  # no head left to cut


def test_split_lm_head_keeps_a_head_with_more_than_a_linear():
    class Capped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(8, 16, bias=False)

        def forward(self, h):
            return torch.tanh(self.head(h) / 30.0)[0] * 30.0

    class Biased(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(8, 16)

        def forward(self, h):
            return self.head(h)[0]

    for module in (Capped(), Biased()):
        gm = torch.export.export(module, (torch.randn(1, 3, 8),)).module()
        assert split_lm_head(gm, min_elements=0) is None


def test_runtime_head_is_for_cpu_only():
    data = default_recipe().normalized()
    data.update(target="cuda")
    data["graphs"]["lm_head"] = "runtime"
    with pytest.raises(RecipeError, match="lm_head.*runtime is for target cpu"):
        Recipe.from_yaml_text(yaml.safe_dump(data))


@pytest.fixture(scope="module")
def runtime_head_artifact(tmp_path_factory):
    from conftest import _compile_default

    return _compile_default(tmp_path_factory, "tiny-runtime-head", compile__backend="eager",
                            graphs__lm_head="runtime").path


def test_runtime_head_artifact_matches_the_graph_head(runtime_head_artifact, tiny_eager_artifact):
    manifest = read_manifest(runtime_head_artifact)
    for graph in manifest.graphs.values():
        assert graph["outputs"] == ["hidden"] and graph["head"]["weight"] == ["model", "lm_head.weight"]
    assert "head" not in read_manifest(tiny_eager_artifact).graphs["decode"]
    ours, theirs = LLM(runtime_head_artifact), LLM(tiny_eager_artifact)
    assert ours.runner.greedy_tokens == gh.supported() and not theirs.runner.greedy_tokens
    prompts = ["Hello, world!", "The quick brown fox jumps", "graphgen"]
    for params in (SamplingParams(max_tokens=12, ignore_eos=True),
                   SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.8, seed=3)):
        a = [o.token_ids for o in ours.generate(prompts, params)]
        b = [o.token_ids for o in theirs.generate(prompts, params)]
        assert a == b, params


def test_greedy_steps_skip_the_sampler_only_where_it_would_take_the_argmax(runtime_head_artifact, monkeypatch):
    llm = LLM(runtime_head_artifact)
    if not llm.runner.greedy_tokens:
        pytest.skip("greedy_head does not run here")
    calls = []
    original = llm.sampler.__call__
    monkeypatch.setattr(type(llm.sampler), "__call__", lambda self, logits, seqs: calls.append(len(seqs))
                        or original(logits, seqs))
    llm.generate(["Hello"], SamplingParams(max_tokens=4, ignore_eos=True))
    assert calls == []  # every step greedy: tokens straight from greedy_head
    llm.generate(["Hello", "world"], [SamplingParams(max_tokens=4, ignore_eos=True),
                                      SamplingParams(max_tokens=4, ignore_eos=True, temperature=1.0, seed=1)])
    assert calls  # a sampled row in the batch: logits and the sampler


def test_bf16_runtime_head_matches_the_graph_head(tmp_path_factory):
    from conftest import _compile_default

    ours, theirs = (LLM(_compile_default(tmp_path_factory, f"tiny-bf16-{head}", compile__backend="eager",
                                         dtype="bfloat16", graphs__lm_head=head).path) for head in ("runtime", "graph"))
    assert "head" in ours.manifest.graphs["decode"] and ours.runner.greedy_tokens == gh.supported()
    prompts = ["Hello, world!", "The quick brown fox jumps"]
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    assert ([o.token_ids for o in ours.generate(prompts, params)]
            == [o.token_ids for o in theirs.generate(prompts, params)])


def test_version_1_artifacts_still_load(tiny_eager_artifact, tmp_path):
    old = tmp_path / "v1"
    shutil.copytree(tiny_eager_artifact, old)
    path = old / "manifest.json"
    data = json.loads(path.read_text())
    data["format_version"] = 1  # every graph returns logits, as this one's do
    path.write_text(json.dumps(data))
    out = LLM(old, verify_checksums=False).generate(["Hi"], SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(out[0].token_ids) == 3


def test_a_head_with_weights_that_are_not_finite_takes_the_argmax_of_its_logits():
    from graphgen.runtime.graphs import Head

    w = torch.randn(100, 16)
    w[3, 2] = float("inf")
    head = Head(w)
    assert not head.greedy
    x = torch.randn(2, 16)
    assert torch.equal(head.tokens(x), torch.ops.graphgen.gemv_linear(x, w).argmax(dim=-1))
    if gh.supported():
        assert Head(torch.randn(100, 16)).greedy
