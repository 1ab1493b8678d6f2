"""graphgen compile: paged passes vs the canonical graph, the tiny artifact vs HF eager, packaging."""
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from graphgen.artifact import read_manifest
from graphgen.capture.export import capture
from graphgen.capture.load import load_model
from graphgen.compiler import compile_recipe, kv_spec_for, paged_graph_module
from graphgen.recipe import Recipe, default_recipe
from graphgen.runtime.graphs import load_graphs
from graphgen.spec import CPU_PHASES, PHASE_INPUTS, cache_input_names
from graphgen.capture.interface import register
from graphgen.passes.lint import LintContext, lint

from models import build_tiny

PROMPTS = [[256, 72, 101, 108, 108, 111, 44, 32, 119], [256, 84, 104, 101], [256, 65, 66, 67, 68, 69, 70, 71, 72, 73,
                                                                              74, 75, 76, 77, 78, 79, 80, 81]]


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


class PagedCache:
    """A hand-built paged cache: each sequence gets its own run of blocks after the scratch block 0."""

    def __init__(self, spec, num_blocks=32):
        self.spec = spec
        self.pools = [torch.zeros(spec.pool_shape(num_blocks)) for _ in cache_input_names(spec.num_layers)]
        self.tables = {}
        self.next_block = 1

    def blocks(self, i, length):
        table = self.tables.setdefault(i, [])
        while len(table) * self.spec.block_size < length:
            table.append(self.next_block)
            self.next_block += 1
        return table

    def slot(self, i, pos):
        table = self.blocks(i, pos + 1)
        return table[pos // self.spec.block_size] * self.spec.block_size + pos % self.spec.block_size

    def table_tensor(self, rows):
        t = torch.zeros(len(rows), self.spec.max_blocks_per_seq, dtype=torch.int32)
        for r, i in enumerate(rows):
            t[r, : len(self.tables[i])] = torch.tensor(self.tables[i], dtype=torch.int32)
        return t


def _prefill(graph, cache, prompts):
    ids, pos, slots, ends = [], [], [], []
    for i, p in enumerate(prompts):
        ids += p
        pos += range(len(p))
        slots += [cache.slot(i, j) for j in range(len(p))]
        ends.append(len(ids))
    t = lambda x: torch.tensor(x, dtype=torch.int64)  # noqa: E731
    return graph(t(ids)[None], t(pos)[None], t([e - 1 for e in ends]), t(ends), t(slots), *cache.pools)


def _decode(graph, cache, seqs):
    t = lambda x: torch.tensor(x, dtype=torch.int64)  # noqa: E731
    slots = [cache.slot(i, len(s) - 1) for i, s in enumerate(seqs)]
    return graph(t([[s[-1]] for s in seqs]), t([[len(s) - 1] for s in seqs]), cache.table_tensor(range(len(seqs))),
                 t([len(s) for s in seqs]), t(slots), *cache.pools)


def _mixed(graph, cache, chunks):
    """One mixed step: chunks [(cache index, tokens, start, n)] compute tokens[start:start + n] of
    each sequence over its prefix in the pool; logits where a chunk reaches the end of its tokens."""
    ids, pos, slots, ends, last, rows, kv = [], [], [], [], [], [], []
    for i, tokens, start, n in chunks:
        ids += tokens[start:start + n]
        pos += range(start, start + n)
        slots += [cache.slot(i, j) for j in range(start, start + n)]
        ends.append(len(ids))
        rows.append(i)
        kv.append(start + n)
        if start + n == len(tokens):
            last.append(len(ids) - 1)
    t = lambda x: torch.tensor(x, dtype=torch.int64)  # noqa: E731
    return graph(t(ids)[None], t(pos)[None], t(last or [len(ids) - 1]), t(ends), cache.table_tensor(rows), t(kv),
                 t(slots), *cache.pools)


def _check_prefill_and_decode(graphs, spec, hf, steps=3, atol=2e-5):
    cache = PagedCache(spec)
    logits = _prefill(graphs["prefill"], cache, PROMPTS)
    seqs = [list(p) for p in PROMPTS]
    for i, s in enumerate(seqs):
        torch.testing.assert_close(logits[i].float(), _hf_logits(hf, s), atol=atol, rtol=0)
    for _ in range(steps):
        for i, s in enumerate(seqs):
            s.append(int(logits[i].argmax()))
        logits = _decode(graphs["decode"], cache, seqs)
        for i, s in enumerate(seqs):
            torch.testing.assert_close(logits[i].float(), _hf_logits(hf, s), atol=atol, rtol=0)
    if "mixed" in graphs:
        _check_mixed(graphs["mixed"], cache, seqs, [int(row.argmax()) for row in logits], hf, atol)


def _check_mixed(graph, cache, seqs, sampled, hf, atol):
    """Chunked prefill beside decode rows: a new 21-token prompt in chunks of 7 and 14, the first
    chunk alone (no logits: a dummy row comes back), the second beside decode rows of two running
    sequences, whose logits come out in step order."""
    for s, token in zip(seqs, sampled):
        s.append(token)
    new = len(seqs)
    prompt = PROMPTS[2] + [33, 34, 35]
    assert len(_mixed(graph, cache, [(new, prompt, 0, 7)])) == 1
    logits = _mixed(graph, cache, [(0, seqs[0], len(seqs[0]) - 1, 1), (new, prompt, 7, 14),
                                   (2, seqs[2], len(seqs[2]) - 1, 1)])
    for row, ids in zip(logits, (seqs[0], prompt, seqs[2])):
        torch.testing.assert_close(row.float(), _hf_logits(hf, ids), atol=atol, rtol=0)


@pytest.fixture(scope="module")
def captured(tiny_captured):
    recipe, model, ep, checkpoint = tiny_captured
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager").eval()
    return recipe, model, ep, hf


@pytest.mark.parametrize("layout", ["BSH", "BNSD"])
def test_paged_passes_reproduce_hf_eager(captured, layout):
    recipe, model, ep, hf = captured
    recipe = Recipe.model_validate(recipe.normalized() | {"kv_cache": {"block_size": 16, "layout": layout, "dtype": "auto"}})
    spec = kv_spec_for(recipe, model)
    graphs, records = {}, {}
    for phase in PHASE_INPUTS:
        graphs[phase], records[phase] = paged_graph_module(ep, phase, spec)
        assert records[phase].matched == spec.num_layers  # every canonical node rewritten
        assert not [n for n in graphs[phase].graph.nodes if n.target is torch.ops.graphgen.attention.default]
    _check_prefill_and_decode(graphs, spec, hf)


def test_extend_graph_reads_the_cached_prefix(captured):
    """A prefix-cache hit: the first 16 tokens are in the pool; extend computes only the tail."""
    recipe, model, ep, hf = captured
    spec = kv_spec_for(recipe, model)
    prefill, _ = paged_graph_module(ep, "prefill", spec)
    extend, _ = paged_graph_module(ep, "extend", spec)
    cache = PagedCache(spec)
    prompt = PROMPTS[2] + [33, 34, 35]
    _prefill(prefill, cache, [prompt[:16]])
    cache.tables[1] = list(cache.tables[0])  # sequence 1 shares the cached block
    tail = list(range(16, len(prompt)))
    t = lambda x: torch.tensor(x, dtype=torch.int64)  # noqa: E731
    slots = [cache.slot(1, j) for j in tail]
    logits = extend(t(prompt[16:])[None], t(tail)[None], t([len(tail) - 1]), cache.table_tensor([1]),
                    t([len(prompt)]), t(slots), *cache.pools)
    torch.testing.assert_close(logits[0], _hf_logits(hf, prompt), atol=2e-5, rtol=0)


@pytest.mark.slow
def test_tiny_artifact_graphs_reproduce_hf_eager(tiny_artifact):
    """The compiled (AOTInductor) graphs, run directly on a hand-built paged cache."""
    manifest = read_manifest(tiny_artifact)
    graphs = load_graphs(manifest, torch.device("cpu"))
    hf = AutoModelForCausalLM.from_pretrained(manifest.model_dir, attn_implementation="eager").eval()
    _check_prefill_and_decode(graphs, manifest.kv, hf, steps=4, atol=1e-4)


@pytest.mark.slow
def test_tiny_artifact_manifest(tiny_artifact):
    m = read_manifest(tiny_artifact)
    assert set(m.graphs) == set(CPU_PHASES)
    for phase, graph in m.graphs.items():
        assert graph["format"] == "aoti"
        assert graph["inputs"] == PHASE_INPUTS[phase] + cache_input_names(m.kv.num_layers)
        # weights come from the checkpoint, not from inside the graph packages; the graphs' own
        # constants are the rotary tables (passes/rotary.py: no cos/sin left in the graphs)
        own = {key for src, key in graph["weights"].values() if src != "model" and not key.startswith("compressed")}
        assert own == {"graphgen_rotary_table_0", "graphgen_rotary_table_1"}
    assert m.path(m.data["constants_file"]).is_file()
    # listed in the order a step reads them, which is how the runtime lays them out in memory
    keys = [key for src, key in m.graphs["decode"]["weights"].values() if src == "model"]
    layer = [f"model.layers.0.{name}.weight" for name in ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj",
             "self_attn.v_proj", "self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj",
             "mlp.down_proj")]
    assert keys[:len(layer) + 1] == ["model.embed_tokens.weight", *layer]
    assert keys.index("model.layers.1.self_attn.q_proj.weight") > keys.index("model.layers.0.mlp.down_proj.weight")
    assert m.data["versions"]["torch"] == torch.__version__
    assert m.data["kv"]["layout"] == "BSH" and m.data["kv"]["block_size"] == 16
    assert m.special_tokens["eos"] == [257]
    assert not m.data["npu_portable"]  # fp32 is not an NPU dtype; the lint says so
    lint = json.loads(m.path("report/lint.json").read_text())
    assert any(f["rule"] == "dtype" for f in lint["findings"])
    # the artifact is a loadable HF checkpoint
    AutoModelForCausalLM.from_pretrained(m.model_dir)


def test_recompile_is_a_noop_and_force_rebuilds(tiny_eager_artifact, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(tiny_eager_artifact, out)
    recipe = Recipe.model_validate(read_manifest(out).data["recipe"])
    again = compile_recipe(recipe, output=out)
    assert again.up_to_date
    before = read_manifest(out).data["files"]
    rebuilt = compile_recipe(recipe, output=out, force=True)
    assert not rebuilt.up_to_date and rebuilt.graphs
    assert read_manifest(out).data["files"].keys() == before.keys()


def test_eager_artifact_runs_and_is_checksummed(tiny_eager_artifact):
    manifest = read_manifest(tiny_eager_artifact)
    graphs = load_graphs(manifest, torch.device("cpu"))
    hf = AutoModelForCausalLM.from_pretrained(manifest.model_dir, attn_implementation="eager").eval()
    _check_prefill_and_decode(graphs, manifest.kv, hf, steps=2)


def test_bf16_block128_recipe_is_npu_expressible(tmp_path):
    data = default_recipe().normalized()
    data.update(dtype="bfloat16", kv_cache={"block_size": 128, "layout": "BNSD", "dtype": "auto"})
    data["compile"]["backend"] = "eager"
    result = compile_recipe(Recipe.model_validate(data), output=tmp_path / "bf16")
    assert result.lint["npu_expressible"], result.lint
    assert read_manifest(result.path).data["npu_portable"] is True


def test_head_dim_not_multiple_of_16_is_zero_padded_exactly(tmp_path):
    data = default_recipe().normalized()
    data["model"]["config"].update(hidden_size=96, head_dim=24, num_attention_heads=4, num_key_value_heads=2)
    recipe = Recipe.model_validate(data)
    model, _, checkpoint = load_model(recipe.model, recipe.dtype, tmp_path)
    spec = kv_spec_for(recipe, model)
    assert (spec.model_head_dim, spec.head_dim) == (24, 32)
    ep, _ = capture(model, max_batch=4, max_seq_len=64)
    graphs = {phase: paged_graph_module(ep, phase, spec)[0] for phase in PHASE_INPUTS}
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager").eval()
    _check_prefill_and_decode(graphs, spec, hf, steps=2)

    data["head_dim_padding"] = "reject"
    with pytest.raises(ValueError, match="head_dim 24, not a multiple of 16"):
        Recipe.model_validate(data)


def test_lint_names_what_the_npu_cannot_express():
    model = build_tiny("gemma2", attn_implementation=register())
    ep, _ = capture(model, max_batch=2, max_seq_len=32)
    ctx = LintContext(target="npu", dtype=torch.float32, block_size=24, kv_dtype="auto", prefill="varlen")
    report = lint([ep.graph_module], ctx)
    rules = {(f.rule, f.layer) for f in report.findings}
    assert ("softcap", 0) in rules and ("softcap", 1) in rules
    assert ("dtype", None) in rules and ("block_size", None) in rules
    assert not report.npu_expressible
    softcap = next(f for f in report.findings if f.rule == "softcap")
    assert "softcap" in softcap.fix and softcap.node.startswith("attention")


def test_python_api_and_cli_on_the_eager_artifact(tiny_eager_artifact):
    import graphgen
    from typer.testing import CliRunner

    from graphgen.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["inspect", str(tiny_eager_artifact), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["name"] == "tiny-llama" and set(info["graphs"]) == set(CPU_PHASES)
    assert info["lint"]["npu_expressible"] is False
    result = runner.invoke(app, ["run", str(tiny_eager_artifact), "--prompt-ids", "256,72,101", "-n", "5", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    (out,) = payload["outputs"]
    assert out["prompt_token_ids"] == [256, 72, 101] and len(out["token_ids"]) <= 5
    assert {"prefill_tokens_per_s", "decode_tokens_per_s"} <= payload["stats"].keys()
    llm = graphgen.LLM(tiny_eager_artifact)
    assert llm.generate([[256, 72, 101]], graphgen.SamplingParams(max_tokens=5))[0].token_ids == out["token_ids"]
    result = runner.invoke(app, ["run", str(tiny_eager_artifact)])
    assert result.exit_code == 1 and "--prompt" in result.output


def test_the_graphgen_command_flushes_its_output_runs_exit_handlers_and_keeps_exit_codes(tiny_eager_artifact, tmp_path):
    """`graphgen` (cli.main) leaves through os._exit to skip the interpreter's teardown: what it
    printed must still arrive, atexit handlers still run, and the exit codes stay typer's."""
    import subprocess
    import sys

    marker = tmp_path / "atexit-ran"
    script = ("import atexit, pathlib, sys; from graphgen.cli import main; "
              f"atexit.register(pathlib.Path({str(marker)!r}).touch); sys.argv[0] = 'graphgen'; main()")

    def graphgen(*args):
        return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)

    ok = graphgen("inspect", str(tiny_eager_artifact), "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["name"] == "tiny-llama" and marker.exists()
    bad = graphgen("inspect", str(tmp_path / "missing"))
    assert bad.returncode == 1 and "no manifest" in bad.stderr
    assert graphgen("no-such-command").returncode == 2
