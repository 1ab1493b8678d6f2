"""Capture: load (config+seed / path / hub cache), the graphgen attention interface, torch.export.

Each architecture's captured graph must hold one canonical attention node per layer carrying the
right attributes, and reproduce HF eager logits at fp32."""
from __future__ import annotations

import hashlib
import shutil

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from graphgen.capture.export import (
    ATTENTION,
    CaptureError,
    attention_sites,
    capture,
    max_abs_error_vs_eager,
)
from graphgen.capture.interface import UnsupportedAttention
from graphgen.capture.load import ModelLoadError, load_model
from graphgen.capture.tokenizer import BOS_ID, EOS_ID, PAD_ID, build_byte_tokenizer, save_byte_tokenizer
from graphgen.recipe import Recipe, default_recipe

from models import TINY, available, build_tiny, expected_windows, tiny_overrides

ATOL = 1e-5


def _spec(overrides: dict, seed: int = 0, **model):
    body = {"name": "t", "model": {"config": overrides, "seed": seed, **model}}
    return Recipe.from_yaml_text(yaml.safe_dump(body)).model


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("model_type", list(TINY))
def test_capture_matches_eager(model_type, tmp_path):
    if not available(model_type):
        pytest.skip(f"transformers has no {model_type}")
    model, _, _ = load_model(_spec(tiny_overrides(model_type)), "float32", tmp_path)
    assert model.config._attn_implementation == "graphgen"
    ep, record = capture(model, max_batch=4, max_seq_len=64)

    n = record.num_layers
    assert n == 2
    sites = record.attention
    assert [s.layer_idx for s in sites] == list(range(n))
    assert len(ep.graph.find_nodes(op="call_function", target=ATTENTION)) == n
    assert [s.sliding_window for s in sites] == expected_windows(model_type)
    assert all(s.causal for s in sites)
    want_softcap = TINY[model_type].get("attn_logit_softcapping", 0.0)
    assert [s.softcap for s in sites] == [want_softcap] * n
    assert [s.has_sinks for s in sites] == [model_type == "gpt_oss"] * n
    attn_modules = [m for m in model.modules() if hasattr(m, "scaling") and hasattr(m, "layer_idx")]
    assert [s.scale for s in sites] == pytest.approx([m.scaling for m in attn_modules])
    cfg = model.config
    kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    assert {(s.num_heads, s.num_key_value_heads, s.head_dim) for s in sites} == {(4, kv, 16)}

    assert max_abs_error_vs_eager(ep, model, [(1, 5), (3, 11)]) < ATOL
    assert model.config._attn_implementation == "graphgen"  # restored after the eager reference run


def test_default_recipe_captures(tmp_path):
    recipe = default_recipe()
    model, tok, ckpt = load_model(recipe.model, recipe.dtype, tmp_path)
    assert ckpt == tmp_path / "checkpoint" and (ckpt / "model.safetensors").is_file()
    ep, record = capture(model, max_batch=recipe.limits.max_num_seqs, max_seq_len=recipe.limits.max_model_len)
    assert record.dims == {"batch": (1, 8), "seq": (1, 256)}
    assert [s.layer_idx for s in record.attention] == [0, 1]
    ids = tok(recipe.verify.prompts, padding=False)["input_ids"][0]
    assert max(ids) < model.config.vocab_size
    assert max_abs_error_vs_eager(ep, model, [(1, len(ids)), (2, 3)]) < ATOL


def test_tiny_models_are_sensitive_to_attention_attributes(tmp_path):
    """The matrix above can fail: a wrong window in the graph moves logits far beyond ATOL."""
    model, _, _ = load_model(_spec(tiny_overrides("mistral")), "float32", tmp_path)
    ep, _ = capture(model, max_batch=4, max_seq_len=64)
    for node in ep.graph.find_nodes(op="call_function", target=ATTENTION):
        node.kwargs = {**node.kwargs, "sliding_window": 0}
    ep.graph_module.recompile()
    assert max_abs_error_vs_eager(ep, model, [(2, 11)]) > 1e-3


def test_softcap_and_sinks_matter_in_tiny_models():
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        for model_type, off in (("gemma2", {"attn_logit_softcapping": None}), ("mistral", {"sliding_window": None})):
            a = build_tiny(model_type)(input_ids=ids).logits
            b = build_tiny(model_type, **off)(input_ids=ids).logits
            assert (a - b).abs().max() > 1e-3, model_type
        if available("gpt_oss"):
            m = build_tiny("gpt_oss")
            a = m(input_ids=ids).logits
            for layer in m.model.layers:
                layer.self_attn.sinks.fill_(-1e4)
            assert (a - m(input_ids=ids).logits).abs().max() > 1e-3


def test_exported_interface_and_dynamic_dims(tmp_path):
    model, _, _ = load_model(_spec(tiny_overrides("llama")), "float32", tmp_path)
    ep, record = capture(model, max_batch=4, max_seq_len=32)
    sig = ep.graph_signature
    assert tuple(sig.user_inputs) == record.input_names == ("input_ids", "position_ids")
    assert len(sig.user_outputs) == 1 and record.output_names == ("logits",)
    assert record.dims == {"batch": (1, 4), "seq": (1, 32)}
    run = ep.module()
    for b, s in [(1, 1), (4, 32), (3, 7)]:
        ids = torch.randint(0, 300, (b, s))
        out = run(ids, torch.arange(s).expand(b, s))
        assert out.shape == (b, s, model.config.vocab_size) and out.dtype == torch.float32
    with pytest.raises(Exception):
        run(torch.zeros(5, 4, dtype=torch.long), torch.arange(4).expand(5, 4))  # batch above max_batch
    # No training bits: no autograd-mode nodes, no parameters that want grads.
    assert not any("grad" in str(n.target) for n in ep.graph.nodes if n.op == "call_function")
    assert not any(p.requires_grad for p in model.parameters())


def test_capture_refuses_seq_beyond_positions(tmp_path):
    model, _, _ = load_model(_spec(tiny_overrides("gpt2")), "float32", tmp_path)
    with pytest.raises(CaptureError, match="max_position_embeddings \\(256\\).*limits.max_model_len"):
        capture(model, max_batch=2, max_seq_len=512)


def test_sdpa_model_captures_without_canonical_nodes():
    model = build_tiny("llama", attn_implementation="sdpa")
    ep, record = capture(model, max_batch=2, max_seq_len=16)
    assert record.attention == [] and attention_sites(ep.graph_module) == []


def test_padding_mask_is_refused_not_dropped(tmp_path):
    model, _, _ = load_model(_spec(tiny_overrides("llama")), "float32", tmp_path)
    ids = torch.randint(0, 300, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    model(input_ids=ids, attention_mask=mask, use_cache=False)  # all ones: nothing to drop
    mask[1, :2] = 0
    with pytest.raises(UnsupportedAttention, match="padding attention_mask"):
        model(input_ids=ids, attention_mask=mask, use_cache=False)


def test_checkpoint_is_deterministic(tmp_path):
    spec = _spec(tiny_overrides("llama"), seed=3)
    _, _, a = load_model(spec, "float32", tmp_path / "a")
    _, _, b = load_model(spec, "float32", tmp_path / "b")
    _, _, c = load_model(_spec(tiny_overrides("llama"), seed=4), "float32", tmp_path / "c")
    assert _sha(a / "model.safetensors") == _sha(b / "model.safetensors")
    assert _sha(a / "model.safetensors") != _sha(c / "model.safetensors")
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_path_source_and_dtype(tmp_path):
    _, _, ckpt = load_model(_spec(tiny_overrides("qwen2")), "float32", tmp_path / "w")
    recipe = Recipe.from_yaml_text("name: p\nmodel: {path: checkpoint}\n", base_dir=tmp_path / "w")
    model, tok, where = load_model(recipe.model, "bfloat16", tmp_path / "w2")
    assert where == ckpt.resolve()
    assert next(model.parameters()).dtype == torch.bfloat16
    assert tok.bos_token_id == BOS_ID  # the checkpoint's own (byte) tokenizer


def test_byte_tokenizer_ids_match_model_config(tmp_path):
    model, tok, ckpt = load_model(_spec(tiny_overrides("llama")), "float32", tmp_path)
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    loaded = AutoTokenizer.from_pretrained(str(ckpt))
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    with pytest.raises(ModelLoadError, match="eos_token_id is 2 but the byte tokenizer uses 257"):
        load_model(_spec(tiny_overrides("llama", eos_token_id=2)), "float32", tmp_path / "x")
    with pytest.raises(ModelLoadError, match="vocab_size 100"):
        load_model(_spec(tiny_overrides("llama", vocab_size=100)), "float32", tmp_path / "y")


_TOK = build_byte_tokenizer()


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_tokenizer_round_trips_any_text(text):
    if any(s in text for s in ("<bos>", "<eos>", "<pad>")):
        return  # special-token strings are parsed as specials, as in every HF tokenizer
    ids = _TOK(text)["input_ids"]
    assert ids == [BOS_ID] + list(text.encode("utf-8"))
    assert _TOK.decode(ids, skip_special_tokens=True) == text


def test_saved_byte_tokenizer_loads_with_auto_tokenizer(tmp_path):
    save_byte_tokenizer(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"tokenizer.json", "tokenizer_config.json"}
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "naïve café — 日本語 🙂\n"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    assert len(tok) == 259


def test_hub_missing_from_cache_gives_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    spec = Recipe.from_yaml_text("name: h\nmodel: {hub: Qwen/Qwen2.5-0.5B}\n").model
    with pytest.raises(ModelLoadError) as info:
        load_model(spec, "float32", tmp_path / "w")
    msg = str(info.value)
    assert "Qwen/Qwen2.5-0.5B" in msg and "not in the local HuggingFace cache" in msg
    assert "huggingface-cli download Qwen/Qwen2.5-0.5B" in msg


def test_hub_loads_from_local_cache(tmp_path, monkeypatch):
    """A repo laid out as the HF cache has it (refs/main -> snapshots/<sha>) loads with no network."""
    import huggingface_hub.constants as hub_constants

    _, _, ckpt = load_model(_spec(tiny_overrides("llama")), "float32", tmp_path / "w")
    repo = tmp_path / "cache" / "models--acme--tiny"
    sha = "0" * 40
    shutil.copytree(ckpt, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    spec = Recipe.from_yaml_text("name: h\nmodel: {hub: acme/tiny}\n").model
    model, tok, where = load_model(spec, "float32", tmp_path / "w2")
    assert where == repo / "snapshots" / sha and tok.eos_token_id == EOS_ID
    assert model.config._attn_implementation == "graphgen"
