"""Recipe schema: valid recipes parse; every kind of mistake names file:line, the key and the fix."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from graphgen.recipe import DEFAULT_RECIPE_YAML, Recipe, RecipeError, default_recipe, load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def _line_of(text: str, needle: str) -> int:
    """1-based line of the first line containing `needle`."""
    for i, line in enumerate(text.splitlines(), 1):
        if needle in line:
            return i
    raise AssertionError(f"{needle!r} not in recipe text")


def _error(text: str) -> str:
    with pytest.raises(RecipeError) as info:
        Recipe.from_yaml_text(text, source="r.yaml")
    return str(info.value)


def _edit(old: str, new: str, text: str = DEFAULT_RECIPE_YAML) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


@pytest.mark.parametrize("name", ["tiny-llama", "llama-local", "qwen2-hub", "mistral-local"])
def test_shipped_recipes_parse(name):
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    assert recipe.name == name
    assert recipe.source.endswith(f"{name}.yaml")


def test_embedded_default_is_recipes_tiny_llama():
    assert (RECIPES / "tiny-llama.yaml").read_text() == DEFAULT_RECIPE_YAML
    assert default_recipe().normalized() == load_recipe(RECIPES / "tiny-llama.yaml").normalized()


def test_default_recipe_contents():
    r = default_recipe()
    assert r.model.source == "config" and r.model.config["model_type"] == "llama"
    assert r.model.tokenizer == "byte" and r.model.seed == 0
    assert r.graphs.decode_batch_sizes == [1, 2, 4, 8]
    assert (r.dtype, r.target, r.compile.backend, r.kv_cache.block_size) == ("float32", "cpu", "inductor", 16)
    assert r.limits.max_model_len == 256 and r.limits.max_num_seqs == 8
    assert r.output == "artifacts/tiny-llama" and r.verify.prompts


def test_model_path_is_relative_to_recipe_file(tmp_path):
    (tmp_path / "sub").mkdir()
    f = tmp_path / "sub" / "r.yaml"
    f.write_text("name: x\nmodel:\n  path: ../ckpt\n  tokenizer: ../tok\n")
    r = load_recipe(f)
    assert r.model.resolved_path() == (tmp_path / "ckpt").resolve()
    assert r.model.resolved_tokenizer() == (tmp_path / "tok").resolve()


def test_normalized_fills_defaults_and_is_stable():
    minimal = "name: m\nmodel:\n  config: {model_type: llama}\n"
    a = Recipe.from_yaml_text(minimal)
    n = a.normalized()
    json.dumps(n)  # JSON-able
    assert n["graphs"]["decode_batch_sizes"] == [1, 2, 4, 8, 16]
    assert n["compile"]["backend"] == "inductor" and n["output"] == "artifacts/m"
    assert n["kv_cache"] == {"block_size": 16, "layout": "BSH", "dtype": "auto"}
    # Same meaning, other spelling (explicit defaults, other key order): same normalized form and key.
    explicit = "model:\n  config: {model_type: llama}\n  seed: 0\ntarget: cpu\nname: m\ndtype: float32\n"
    b = Recipe.from_yaml_text(explicit)
    assert b.normalized() == n and b.fingerprint() == a.fingerprint()
    assert Recipe.from_yaml_text(minimal.replace("name: m", "name: n")).fingerprint() != a.fingerprint()


def test_head_dim_reject_accepts_aligned_and_pad_accepts_any():
    Recipe.from_yaml_text(_edit("head_dim_padding: pad", "head_dim_padding: reject"))
    Recipe.from_yaml_text(_edit("head_dim: 16", "head_dim: 24"))


def test_derived_defaults_follow_target_and_limits():
    r = Recipe.from_yaml_text("name: m\nmodel: {hub: a/b}\ntarget: npu\ndtype: bfloat16\nlimits: {max_num_seqs: 12}\n")
    assert r.compile.backend == "torchair" and r.compile.torchair.mode == "max-autotune"
    assert r.graphs.decode_batch_sizes == [1, 2, 4, 8, 12]


def test_unknown_key_names_line_and_allowed_keys():
    text = _edit("  layout: BSH\n", "  layout: BSH\n  colour: red\n")
    msg = _error(text)
    assert f"r.yaml:{_line_of(text, 'colour')}: kv_cache.colour: unknown key" in msg
    assert "block_size, layout, dtype" in msg


def test_unknown_top_level_key():
    text = DEFAULT_RECIPE_YAML + "optimise: true\n"
    msg = _error(text)
    assert f"r.yaml:{_line_of(text, 'optimise')}: optimise: unknown key" in msg
    assert "kv_cache" in msg and "attention_ops" in msg


@pytest.mark.parametrize(
    "old,new,key,needle,expect",
    [
        ("max_new_tokens: 16", 'max_new_tokens: "16"', "verify.max_new_tokens", "max_new_tokens", "valid integer"),
        ("block_size: 16", "block_size: 16.5", "kv_cache.block_size", "block_size", "valid integer"),
        ("dtype: float32", "dtype: fp32", "dtype", "dtype: fp32", "'float32', 'bfloat16' or 'float16'"),
        ("target: cpu", "target: tpu", "target", "target:", "'cpu', 'cuda' or 'npu'"),
        ("layout: BSH", "layout: TND", "kv_cache.layout", "layout", "'BSH' or 'BNSD'"),
        ("head_dim_padding: pad", "head_dim_padding: crop", "head_dim_padding", "head_dim_padding", "'pad' or 'reject'"),
        ("attention_ops: ifa_pfa", "attention_ops: sdpa", "attention_ops", "attention_ops", "'ifa_pfa' or 'fia'"),
        ("backend: inductor", "backend: tvm", "compile.backend", "backend", "'inductor', 'torchair' or 'eager'"),
        ("prefill: varlen", "prefill: 7", "graphs.prefill", "prefill", "'varlen' or a mapping"),
        ("prefill: varlen", "prefill: padded", "graphs.prefill", "prefill", "'varlen'"),
        ("decode_batch_sizes: [1, 2, 4, 8]", "decode_batch_sizes: 8", "graphs.decode_batch_sizes",
         "decode_batch_sizes", "valid list"),
        ("name: tiny-llama", "name: tiny llama/x", "name", "name:", "pattern"),
    ],
)
def test_wrong_type_or_value(old, new, key, needle, expect):
    text = _edit(old, new)
    msg = _error(text)
    assert f"r.yaml:{_line_of(text, needle)}: {key}: " in msg, msg
    assert expect in msg, msg


def test_missing_required_key_points_at_parent():
    msg = _error("name: x\ndtype: float32\n")
    assert "r.yaml:1: model: required key is missing" in msg


def test_duplicate_key_is_an_error():
    text = _edit("target: cpu\n", "target: cpu\ntarget: cuda\n")
    assert f"r.yaml:{_line_of(text, 'target: cuda')}: target: duplicate key" in _error(text)


def test_yaml_syntax_error_has_line():
    msg = _error("name: x\nmodel: [\n")
    assert re.match(r"r\.yaml:\d+: not valid YAML", msg)


def test_not_a_mapping():
    assert "a recipe is a YAML mapping" in _error("- a\n- b\n")


def test_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")


# --- cross-field checks: (edits, key, line needle, expected text) --------------------------------
CROSS = [
    pytest.param([("block_size: 16", "block_size: 24")], "kv_cache.block_size", "block_size",
                 "24 is not a multiple of 16; use 16, 32, 48, ...", id="block16"),
    pytest.param([("block_size: 16", "block_size: 0")], "kv_cache.block_size", "block_size",
                 "0 is not a multiple of 16", id="block0"),
    pytest.param([("block_size: 16", "block_size: 48"), ("dtype: auto", "dtype: int8")], "kv_cache.block_size",
                 "block_size", "48 is not a multiple of 32 for an int8 KV cache; use 32, 64, 96", id="block-int8"),
    pytest.param([("block_size: 16", "block_size: 64"), ("attention_ops: ifa_pfa", "attention_ops: fia"),
                  ("target: cpu", "target: npu"), ("dtype: float32", "dtype: float16"),
                  ("backend: inductor", "backend: torchair")], "kv_cache.block_size", "block_size",
                 "64 is not a multiple of 128 with attention_ops fia on npu", id="block-fia-npu"),
    pytest.param([("decode_batch_sizes: [1, 2, 4, 8]", "decode_batch_sizes: [1, 4, 2, 8]")],
                 "graphs.decode_batch_sizes", "decode_batch_sizes", "is not sorted; use [1, 2, 4, 8]", id="decode-sorted"),
    pytest.param([("decode_batch_sizes: [1, 2, 4, 8]", "decode_batch_sizes: [1, 2, 2, 8]")],
                 "graphs.decode_batch_sizes", "decode_batch_sizes", "has duplicates", id="decode-unique"),
    pytest.param([("decode_batch_sizes: [1, 2, 4, 8]", "decode_batch_sizes: [0, 2, 4, 8]")],
                 "graphs.decode_batch_sizes", "decode_batch_sizes", "must be >= 1", id="decode-positive"),
    pytest.param([("decode_batch_sizes: [1, 2, 4, 8]", "decode_batch_sizes: [1, 2, 4, 16]")],
                 "graphs.decode_batch_sizes", "decode_batch_sizes", "16 exceeds limits.max_num_seqs (8)", id="decode-max"),
    pytest.param([("decode_batch_sizes: [1, 2, 4, 8]", "decode_batch_sizes: []")],
                 "graphs.decode_batch_sizes", "decode_batch_sizes", "needs at least one", id="decode-empty"),
    pytest.param([("prefill: varlen", "prefill: {buckets: [64, 32]}")], "graphs.prefill.buckets", "prefill",
                 "is not sorted; use [32, 64]", id="prefill-sorted"),
    pytest.param([("prefill: varlen", "prefill: {buckets: [64, 1024]}")], "graphs.prefill.buckets", "prefill",
                 "1024 exceeds limits.max_num_batched_tokens (512)", id="prefill-max"),
    pytest.param([("target: cpu", "target: npu"), ("backend: inductor", "backend: torchair")], "dtype",
                 "dtype: float32", "float32 on npu", id="npu-dtype"),
    pytest.param([("backend: inductor", "backend: torchair")], "compile.backend", "backend",
                 "torchair does not build for target cpu; use inductor or eager", id="torchair-on-cpu"),
    pytest.param([("target: cpu", "target: npu"), ("dtype: float32", "dtype: bfloat16")], "compile.backend",
                 "backend", "inductor does not build for target npu; use torchair or eager", id="inductor-on-npu"),
    pytest.param([("backend: inductor", "backend: inductor\n  torchair: {mode: max-autotune}")], "compile.torchair",
                 "torchair:", "torchair options need backend torchair", id="torchair-opts"),
    pytest.param([("max_model_len: 256", "max_model_len: 0")], "limits.max_model_len", "max_model_len",
                 "0 must be >= 1", id="max-model-len"),
    pytest.param([("max_num_batched_tokens: 512", "max_num_batched_tokens: 4")], "limits.max_num_batched_tokens",
                 "max_num_batched_tokens", "below max_num_seqs (8)", id="batched-tokens"),
    pytest.param([("  seed: 0\n", "  seed: 0\n  hub: org/model\n")], "model.hub", "hub:",
                 "exactly one of path | config | hub (got config, hub)", id="two-sources"),
    pytest.param([("head_dim_padding: pad", "head_dim_padding: reject"), ("head_dim: 16", "head_dim: 24")],
                 "head_dim_padding", "head_dim_padding", "head_dim 24, not a multiple of 16", id="head-dim-reject"),
    pytest.param([("max_new_tokens: 16", "max_new_tokens: 0")], "verify.max_new_tokens", "max_new_tokens",
                 "0 must be >= 1", id="max-new-tokens"),
]


@pytest.mark.parametrize("edits,key,needle,expect", CROSS)
def test_cross_field_checks(edits, key, needle, expect):
    text = DEFAULT_RECIPE_YAML
    for old, new in edits:
        text = _edit(old, new, text)
    msg = _error(text)
    assert f"r.yaml:{_line_of(text, needle)}: {key}: " in msg, msg
    assert expect in msg, msg


@pytest.mark.parametrize(
    "text,key,expect",
    [
        ("name: x\nmodel:\n  path: ./c\n  seed: 3\n", "model.seed", "seed only applies to model.config"),
        ("name: x\nmodel:\n  path: ./c\n  revision: main\n", "model.revision", "revision only applies to model.hub"),
        ("name: x\nmodel:\n  config: {hidden_size: 8}\n", "model.config", "needs model_type"),
    ],
)
def test_model_source_checks(text, key, expect):
    msg = _error(text)
    assert f"r.yaml:{_line_of(text, key.split('.')[-1] + ':')}: {key}: {expect}" in msg, msg


def test_every_problem_is_reported_at_once():
    text = _edit("block_size: 16", "block_size: 24", _edit("decode_batch_sizes: [1, 2, 4, 8]", "decode_batch_sizes: [2, 1]"))
    msg = _error(text)
    assert "kv_cache.block_size" in msg and "graphs.decode_batch_sizes" in msg
    assert len(msg.splitlines()) == 2
