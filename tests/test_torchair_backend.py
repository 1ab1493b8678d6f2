"""backends.torchair: CompilerConfig and persistence calls with torchair mocked; the guards of
NpuGraph (uncovered shapes, host lengths rebuilt per call, versions, cache permissions); and the
whole npu path (lowering, stand-in compile, runtime) vs HF eager on the tiny model."""
import sys
import types

import pytest
import torch
import yaml

from graphgen.backends import torchair as tb
from graphgen.recipe import DEFAULT_RECIPE_YAML, Recipe, TorchairOptions


class _Options(types.SimpleNamespace):
    pass


def _fake_torchair(calls: list, *, old_cache_signature=False):
    """A torchair with the API surface graphgen uses (names as upstream), recording calls."""
    class CompilerConfig:
        def __init__(self):
            self.mode = "max-autotune"
            self.experimental_config = _Options(frozen_parameter=False, tiling_schedule_optimize=False)
            self.debug = _Options(graph_dump=_Options(type=None, path=None))

    if old_cache_signature:
        def cache_compile(func, *, config=None, dynamic=True, root=None, rank=None, **kwargs):
            calls.append(("cache_compile", func, dict(config=config, dynamic=dynamic, root=root)))
            return func
    else:
        def cache_compile(func, *, config=None, backend=None, dynamic=True, cache_dir=None, global_rank=None,
                          tp_rank=None, pp_rank=None, custom_decompositions=None, ge_cache=False, **kwargs):
            calls.append(("cache_compile", func, dict(config=config, dynamic=dynamic, cache_dir=cache_dir)))
            return func

    def dynamo_export(*args, model, export_path="export_file", export_name="export", dynamic=False, config=None,
                      **kwargs):
        calls.append(("dynamo_export", args, dict(model=model, export_path=export_path, export_name=export_name,
                                                  dynamic=dynamic, config=config)))

    def get_npu_backend(*, compiler_config=None, **kwargs):
        calls.append(("get_npu_backend", compiler_config))
        return "npu_backend"

    mod = types.ModuleType("torchair")
    mod.__version__ = "0.0-fake"
    mod.CompilerConfig = CompilerConfig
    mod.get_npu_backend = get_npu_backend
    mod.dynamo_export = dynamo_export
    mod.inference = types.SimpleNamespace(cache_compile=cache_compile)
    return mod


@pytest.fixture
def fake_torchair(monkeypatch):
    calls = []
    npu = types.ModuleType("torch_npu")
    npu.__version__ = "2.13.0.fake"
    monkeypatch.setitem(sys.modules, "torch_npu", npu)
    monkeypatch.setitem(sys.modules, "torchair", _fake_torchair(calls))  # after torch_npu: the right order
    monkeypatch.setattr(tb, "STAND_IN", None)
    return calls


def test_compiler_config_is_what_the_recipe_says(fake_torchair, tmp_path):
    opts = TorchairOptions(mode="reduce-overhead", frozen_parameter=True, tiling_schedule_optimize=True, graph_dump="py")
    config = tb.compiler_config(opts, dump_dir=tmp_path)
    assert config.mode == "reduce-overhead"
    assert config.experimental_config.frozen_parameter is True
    assert config.experimental_config.tiling_schedule_optimize is True
    assert config.debug.graph_dump.type == "py" and config.debug.graph_dump.path == str(tmp_path)
    default = tb.compiler_config({})
    assert default.mode == "max-autotune" and default.debug.graph_dump.type is None
    assert default.experimental_config.frozen_parameter is False


@pytest.mark.parametrize("old", [False, True])
def test_cache_compile_gets_the_bound_method_config_and_artifact_cache_dir(monkeypatch, tmp_path, old):
    calls = []
    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))
    monkeypatch.setitem(sys.modules, "torchair", _fake_torchair(calls, old_cache_signature=old))
    monkeypatch.setattr(tb, "STAND_IN", None)
    module = torch.nn.Linear(2, 2)
    cache = tmp_path / "graphs" / tb.CACHE_DIR / "decode_4_nb9"
    tb._compile(module, {"mode": "max-autotune", "tiling_schedule_optimize": True}, dynamic=True, cache_dir=cache)
    (name, func, kw), = [c for c in calls if c[0] == "cache_compile"]
    assert func == module.forward and func.__self__ is module  # a bound method of an nn.Module
    assert kw["dynamic"] is True and kw["config"].experimental_config.tiling_schedule_optimize is True
    assert kw["root" if old else "cache_dir"] == str(cache) and cache.is_dir()
    assert oct(cache.stat().st_mode & 0o777) == oct(0o700)


def test_dynamo_export_arguments_and_frozen_parameter_refusal(fake_torchair, tmp_path):
    module = torch.nn.Linear(2, 2)
    x = torch.randn(1, 2)
    path = tb.export_air(module, (x,), tmp_path / "air", "decode_4", {"mode": "max-autotune"})
    (name, args, kw), = [c for c in fake_torchair if c[0] == "dynamo_export"]
    assert args == (x,) and kw["model"] is module and kw["export_path"] == str(tmp_path / "air")
    assert kw["export_name"] == "decode_4" and kw["dynamic"] is False and kw["config"].mode == "max-autotune"
    assert path == tmp_path / "air" / "decode_4.air"
    with pytest.raises(tb.TorchairError, match="frozen_parameter"):
        tb.export_air(module, (x,), tmp_path, "x", {"frozen_parameter": True})


def test_import_order_trap_is_refused(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    monkeypatch.setitem(sys.modules, "torchair", types.ModuleType("torchair"))
    assert tb.import_order_ok() is False
    with pytest.raises(tb.TorchairError, match="before torch_npu"):
        tb.import_torchair()


def test_npugraph_ex_needs_the_backend(fake_torchair, monkeypatch):
    monkeypatch.setattr(torch._dynamo, "list_backends", lambda exclude_tags=(): ["eager"])
    with pytest.raises(tb.TorchairError, match="npugraph_ex"):
        tb._compile(torch.nn.Linear(2, 2), {"mode": "npugraph_ex"}, dynamic=True, cache_dir=None)


def _graph(phase, buckets, seen):
    class Probe(torch.nn.Module):
        def forward(self, *args):
            seen.append(args)
            return args[0].float()

    modules = {b: Probe() for b in (buckets or [None])}
    names = ["input_ids", "position_ids", "block_table", "seq_lens", "slot_mapping", "key_cache_0"]
    g = tb.NpuGraph(phase=phase, buckets=buckets, modules=modules, options={}, cache_root=None, input_names=names)
    g.compiled = {b: m for b, m in modules.items()}
    return g


def test_uncovered_batch_is_refused_never_run_eagerly():
    g = _graph("decode", [2, 4], [])
    with pytest.raises(tb.UncoveredBatchError, match="batch size 3.*refusing"):
        g(torch.zeros(3, 1), torch.zeros(3, 1), torch.zeros(3, 4), torch.ones(3), torch.zeros(3), torch.zeros(2, 4))


def test_host_lengths_are_rebuilt_from_seq_lens_at_every_call():
    seen = []
    g = _graph("decode", [2], seen)
    seq_lens = torch.tensor([5, 1])
    args = (torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, 4, dtype=torch.int32), seq_lens, torch.zeros(2),
            torch.zeros(2, 16, 8))
    g(*args)
    seq_lens += 1  # what npu_advance_step_flashattn does between steps, in place
    g(*args)
    assert seen[0][-1] == [5, 1] and seen[1][-1] == [6, 2]
    assert g.calls == {2: 2}
    assert getattr(args[2], "_dynamo_static_indices", None) is not None  # block table marked static


def test_version_mismatch_is_refused_with_the_rebuild_command(tmp_path):
    built = {"torch": "2.13.0", "torch_npu": "2.13.0", "torchair": "0.1", "cann": "8.2"}
    tb.check_versions(built, dict(built), tmp_path)
    with pytest.raises(tb.TorchairError, match=r"cann 8.2 -> 8.3.*graphgen compile <recipe> --target npu --force"):
        tb.check_versions(built, built | {"cann": "8.3"}, tmp_path)


def test_cache_files_must_be_0600(tmp_path):
    f = tmp_path / "decode_4_nb9" / "compiled_module"
    f.parent.mkdir()
    f.write_bytes(b"x")
    f.chmod(0o644)
    with pytest.raises(tb.TorchairError, match="0600"):
        tb.check_cache(tmp_path)
    tb.secure_cache(tmp_path)
    tb.check_cache(tmp_path)
    assert f.stat().st_mode & 0o777 == 0o600


def test_frozen_parameter_refuses_non_contiguous_weights():
    src = "\n\ndef forward(self, x):\n    w = self.w\n    return torch.ops.aten.mm.default(x, w)\n"
    w = torch.randn(4, 3).t()
    with pytest.raises(tb.TorchairError, match="non-contiguous w"):
        tb.build_module(src, {"w": "parameter"}, {"w": w}, device="cpu", name="M", frozen_parameter=True)
    module = tb.build_module(src, {"w": "parameter"}, {"w": w}, device="cpu", name="M")
    torch.testing.assert_close(module(torch.ones(2, 3)), torch.ones(2, 3) @ w)


def test_default_prefill_ladder():
    assert tb.default_prefill_buckets(64, 512) == [16, 32, 64]
    assert tb.default_prefill_buckets(100, 48) == [16, 32, 48]


# --- end to end through emulation ---------------------------------------------------------------
def npu_recipe(attention_ops="ifa_pfa", **over) -> Recipe:
    data = yaml.safe_load(DEFAULT_RECIPE_YAML)
    data.update(target="npu", dtype="bfloat16", attention_ops=attention_ops)
    data["compile"] = {"backend": "torchair", "torchair": {"tiling_schedule_optimize": True}}
    data["limits"] = {"max_model_len": 128, "max_num_seqs": 4, "max_num_batched_tokens": 128}
    data["graphs"] = {"decode_batch_sizes": [2, 4], "prefill": {"buckets": [16, 32]}}
    data["kv_cache"] = {"block_size": 128 if attention_ops == "fia" else 16, "layout": "BSH", "dtype": "auto"}
    data.update(over)
    return Recipe.model_validate(data)


PROMPTS = [[256, 72, 101, 108, 108, 111, 44, 32, 119], [256, 84, 104, 101], [256] + list(range(65, 85))]


def _hf_greedy(model_dir, prompts, n):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.bfloat16).eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
            out.append(gen[0, len(p):].tolist())
    return out


@pytest.fixture(scope="module")
def npu_artifacts(tmp_path_factory):
    from graphgen.compiler import compile_recipe

    old = tb.STAND_IN
    tb.STAND_IN = "eager"
    try:
        root = tmp_path_factory.mktemp("npu")
        built = {ops: compile_recipe(npu_recipe(ops), output=root / ops, force=True) for ops in ("ifa_pfa", "fia")}
        yield built
    finally:
        tb.STAND_IN = old


@pytest.mark.slow
def test_npu_artifact_layout_and_manifest(npu_artifacts):
    import json

    from graphgen.artifact import read_manifest

    res = npu_artifacts["ifa_pfa"]
    m = read_manifest(res.path)
    assert m.data["target"] == "npu" and m.data["device"] == "cpu"  # a stand-in build runs emulated
    g = m.graphs
    assert set(g) == {"prefill", "decode"}  # block_size 16: no FIA paged extend graph
    assert g["prefill"]["format"] == "torchair" and g["prefill"]["packing"] == "per_sequence"
    assert g["prefill"]["token_buckets"] == [16, 32] and g["decode"]["batch_sizes"] == [2, 4]
    assert set(g["decode"]["npu_versions"]) == {"torch", "torch_npu", "torchair", "cann"}
    index = json.loads((res.path / "graphs" / "prefill" / "index.json").read_text())
    assert index["files"] == {"16": "graph_16.py", "32": "graph_32.py"} and index["stand_in"] == "eager"
    src = (res.path / "graphs" / "prefill" / "graph_16.py").read_text()
    assert "actual_seq_lengths = [16]" in src and "npu_scatter_nd_update_" in src
    assert res.lint["npu_expressible"]
    assert set(m.graphs) | {"extend"} == set(read_manifest(npu_artifacts["fia"].path).graphs)


@pytest.mark.slow
def test_npu_runtime_greedy_matches_hf_eager_in_both_lowerings(npu_artifacts):
    from graphgen.runtime.engine import LLM
    from graphgen.runtime.params import SamplingParams

    old = tb.STAND_IN
    tb.STAND_IN = "eager"
    try:
        n = 8
        tokens = {}
        for ops, res in npu_artifacts.items():
            llm = LLM(res.path)
            outs = llm.generate(PROMPTS, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
            tokens[ops] = [o.token_ids for o in outs]
            graphs = llm.runner.graphs
            assert set(graphs["decode"].compiled) == {2, 4}  # compiled per bucket at load, before serving
            assert set(graphs["prefill"].calls) <= {16, 32} and graphs["decode"].calls
        want = _hf_greedy(npu_artifacts["ifa_pfa"].path / "model", PROMPTS, n)
        assert tokens["ifa_pfa"] == want
        assert tokens["fia"] == want
    finally:
        tb.STAND_IN = old


def test_compile_for_npu_without_torchair_says_what_to_do(monkeypatch, tmp_path):
    from graphgen.compiler import CompileError, compile_recipe

    monkeypatch.setattr(tb, "STAND_IN", None)
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # import fails like on a machine without it
    with pytest.raises(CompileError, match="GRAPHGEN_TORCHAIR_STAND_IN=eager"):
        compile_recipe(npu_recipe(), output=tmp_path / "x")
    assert not (tmp_path / "x").exists()
