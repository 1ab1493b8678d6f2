"""Load the recipe's model through transformers' own from_pretrained, with graphgen attention.

Three sources (recipe `model:`): a local checkpoint dir; a config + seed, which is initialized,
saved as a real safetensors checkpoint and loaded back (so the loading code under test is the
real one and the same recipe gives bitwise-identical weights); or a hub repo id, resolved from
the local HF cache only.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from . import tokenizer as byte_tok
from .interface import register

if TYPE_CHECKING:  # the spec is duck-typed: capture does not import the recipe layer
    from ..recipe import ModelSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """The model or its tokenizer could not be loaded; says which and what to do."""


def load_model(
    spec: ModelSpec, dtype: str | torch.dtype, workdir: str | Path
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, Path]:
    """-> (model in eval mode with attn_implementation "graphgen" and no grads, tokenizer, checkpoint dir).

    A config-built model is written to `workdir`/checkpoint (weights + config + tokenizer) first.
    """
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    workdir = Path(workdir)
    if spec.config is not None:
        checkpoint = _build_from_config(spec, workdir / "checkpoint")
    elif spec.path is not None:
        checkpoint = spec.resolved_path()
        if not (checkpoint / "config.json").is_file():
            raise ModelLoadError(f"model.path {checkpoint}: no config.json there; point it at a save_pretrained folder")
    else:
        checkpoint = _hub_snapshot(spec.hub, spec.revision)
    tokenizer = _load_tokenizer(spec, checkpoint)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(checkpoint), dtype=torch_dtype, attn_implementation=register(), local_files_only=True
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"loading {checkpoint} with transformers failed: {exc}") from exc
    model.eval().requires_grad_(False)
    _check_special_ids(model.config, tokenizer, spec)
    return model, tokenizer, checkpoint


def _build_from_config(spec: ModelSpec, checkpoint: Path) -> Path:
    overrides = dict(spec.config)
    model_type = overrides.pop("model_type")
    tokenizer_spec = spec.tokenizer or "byte"
    if tokenizer_spec == "byte":
        for key, value in (("bos_token_id", byte_tok.BOS_ID), ("eos_token_id", byte_tok.EOS_ID),
                           ("pad_token_id", byte_tok.PAD_ID)):
            if overrides.setdefault(key, value) != value:
                raise ModelLoadError(f"model.config.{key} is {overrides[key]} but the byte tokenizer uses {value}; "
                                     "remove it from the recipe")
    try:
        config = AutoConfig.for_model(model_type, **overrides)
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"model.config: transformers cannot build a {model_type!r} config: {exc}") from exc
    if tokenizer_spec == "byte" and getattr(config, "vocab_size", byte_tok.VOCAB_SIZE) < byte_tok.VOCAB_SIZE:
        raise ModelLoadError(f"model.config.vocab_size {config.vocab_size} is below the byte tokenizer's "
                             f"{byte_tok.VOCAB_SIZE} ids; use at least {byte_tok.VOCAB_SIZE}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    checkpoint.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(checkpoint))
    if tokenizer_spec == "byte":
        byte_tok.save_byte_tokenizer(checkpoint)
    else:
        AutoTokenizer.from_pretrained(str(spec.resolved_tokenizer())).save_pretrained(str(checkpoint))
    return checkpoint


def _hub_snapshot(repo: str, revision: str | None) -> Path:
    """The cached snapshot folder of `repo`; graphgen never downloads."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.constants import HF_HUB_CACHE

    found = try_to_load_from_cache(repo, "config.json", revision=revision)
    if not isinstance(found, str):
        at = f"@{revision}" if revision else ""
        rev = f" --revision {revision}" if revision else ""
        raise ModelLoadError(
            f"model.hub {repo}{at} is not in the local HuggingFace cache ({HF_HUB_CACHE}); graphgen never downloads. "
            f"Run `huggingface-cli download {repo}{rev}` where there is network (or set HF_HOME to a cache that has "
            "it), or point model.path at a local checkpoint folder."
        )
    return Path(found).parent


def _load_tokenizer(spec: ModelSpec, checkpoint: Path) -> PreTrainedTokenizerBase:
    source = spec.resolved_tokenizer()
    if source == "byte" or (source is None and spec.config is not None):
        return byte_tok.build_byte_tokenizer()
    where = Path(source) if source is not None else checkpoint
    try:
        return AutoTokenizer.from_pretrained(str(where), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"no tokenizer loadable from {where} ({exc}); set model.tokenizer to a tokenizer folder or `byte`"
        ) from exc


def _check_special_ids(config, tokenizer: PreTrainedTokenizerBase, spec: ModelSpec) -> None:
    """A byte tokenizer on someone else's checkpoint is only usable if the ids agree."""
    if spec.tokenizer != "byte" and spec.config is None:
        return
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and vocab < byte_tok.VOCAB_SIZE:
        raise ModelLoadError(f"vocab_size {vocab} is below the byte tokenizer's {byte_tok.VOCAB_SIZE} ids; raise it")
    for key, want in (("bos_token_id", byte_tok.BOS_ID), ("eos_token_id", byte_tok.EOS_ID)):
        got = getattr(config, key, None)
        if got is not None and got != want and not (isinstance(got, list) and want in got):
            raise ModelLoadError(f"config {key} is {got} but the byte tokenizer uses {want}")
