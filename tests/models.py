"""Tiny HF configs for tests: hidden 64, 2 layers, vocab 320 (covers the byte tokenizer's 259 ids).

initializer_range is raised from HF's 0.02 so attention is peaked: a wrong mask, window, softcap or
sink then moves the logits far beyond test tolerances instead of hiding in near-uniform attention.
"""
from __future__ import annotations

from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 320
COMMON = dict(vocab_size=VOCAB, initializer_range=0.2, bos_token_id=256, eos_token_id=257, pad_token_id=258)
LLAMA_LIKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256)

# model_type -> HF config overrides.
TINY: dict[str, dict[str, Any]] = {
    "llama": dict(LLAMA_LIKE),
    "qwen2": dict(LLAMA_LIKE),
    "mistral": dict(LLAMA_LIKE, sliding_window=4),
    "gemma2": dict(LLAMA_LIKE, sliding_window=4, attn_logit_softcapping=1.0, query_pre_attn_scalar=16,
                   layer_types=["sliding_attention", "full_attention"]),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=256, rotary_pct=0.5),
    "gpt_oss": dict(LLAMA_LIKE, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                    layer_types=["sliding_attention", "full_attention"]),
    "qwen3": dict(LLAMA_LIKE),  # q/k RMSNorm per head
    # head_dim = hidden_size // num_attention_heads; fused qkv / gate_up projections
    "phi3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, original_max_position_embeddings=256),
    "olmo2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256),  # q/k RMSNorm over all heads, post-norms
}


def available(model_type: str) -> bool:
    """Whether this transformers has the architecture (gpt_oss and gemma2 are recent)."""
    try:
        AutoConfig.for_model(model_type)
    except (ValueError, KeyError):
        return False
    return True


def tiny_overrides(model_type: str, **extra: Any) -> dict[str, Any]:
    """The config overrides for `model_type` (with model_type itself), as a recipe's model.config."""
    return {"model_type": model_type, **COMMON, **TINY[model_type], **extra}


def tiny_config(model_type: str, **extra: Any) -> transformers.PretrainedConfig:
    over = tiny_overrides(model_type, **extra)
    return AutoConfig.for_model(over.pop("model_type"), **over)


def build_tiny(model_type: str, *, attn_implementation: str = "eager", seed: int = 0, **extra: Any) -> torch.nn.Module:
    """A randomly initialized tiny model in eval mode, fp32, deterministic in `seed`."""
    config = tiny_config(model_type, **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    return model.eval()


def expected_windows(model_type: str) -> list[int]:
    """Per-layer sliding window each tiny model means (0 = full attention)."""
    over = TINY[model_type]
    n = over.get("num_hidden_layers", over.get("n_layer"))
    if "layer_types" in over:
        return [over["sliding_window"] if t == "sliding_attention" else 0 for t in over["layer_types"]]
    return [over.get("sliding_window", 0)] * n


def tiny_recipe(model_type: str, *, name: str | None = None, dtype: str = "float32", backend: str = "eager",
                block_size: int = 16, layout: str = "BSH", prompts: list[str] | None = None, max_new_tokens: int = 6,
                **config: Any):
    """A recipe compiling the tiny `model_type` (config overrides `config` on top of TINY's), small
    limits so the graphs stay cheap: 4 sequences, 64 tokens each, decode buckets 1/2/4."""
    from graphgen.recipe import Recipe

    return Recipe.model_validate({
        "name": name or f"tiny-{model_type}",
        "model": {"config": tiny_overrides(model_type, **config), "seed": 0, "tokenizer": "byte"},
        "dtype": dtype,
        "kv_cache": {"block_size": block_size, "layout": layout},
        "limits": {"max_model_len": 64, "max_num_seqs": 4, "max_num_batched_tokens": 256},
        "graphs": {"decode_batch_sizes": [1, 2, 4]},
        "compile": {"backend": backend},
        "verify": {"prompts": prompts or ["The quick brown fox jumps", "The quick brown fox sleeps", "graphgen"],
                   "max_new_tokens": max_new_tokens},
    })
