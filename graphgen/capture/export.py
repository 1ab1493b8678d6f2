"""Non-strict torch.export of `logits = model(input_ids, position_ids)` with dynamic batch and sequence.

The exported program's interface (what every later pass starts from):
  inputs   input_ids    int64 (batch, seq)
           position_ids int64 (batch, seq)    absolute positions, one sequence per row, no padding
  output   logits       model dtype (batch, seq, vocab_size)
  dims     batch in [1, max_batch], seq in [1, max_seq_len]
Attention sees only the current tokens (use_cache=False): the KV cache is added later by passes.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

import torch
from torch.export import Dim, ExportedProgram

from .interface import NAME

ATTENTION = torch.ops.graphgen.attention.default
INPUT_NAMES = ("input_ids", "position_ids")
OUTPUT_NAMES = ("logits",)


class CaptureError(RuntimeError):
    """Capture could not produce the graph graphgen needs; says what and how to fix it."""


@dataclass
class AttentionSite:
    """One canonical attention node: its name in the graph and every attribute it carries."""

    node: str
    layer_idx: int
    scale: float
    causal: bool
    sliding_window: int
    softcap: float
    has_sinks: bool
    num_heads: int
    num_key_value_heads: int
    head_dim: int


@dataclass
class CaptureRecord:
    """What capture produced: the attention sites in layer order, and the program's interface."""

    attention: list[AttentionSite]
    num_layers: int
    input_names: tuple[str, ...] = INPUT_NAMES
    output_names: tuple[str, ...] = OUTPUT_NAMES
    dims: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (min, max)

    def to_dict(self) -> dict:
        return asdict(self)


class _Logits(torch.nn.Module):
    """forward(input_ids, position_ids) -> logits: the one signature graphgen exports."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


def attention_sites(gm: torch.fx.GraphModule) -> list[AttentionSite]:
    """Every graphgen.attention node of `gm` with its attributes (schema defaults filled), in graph order."""
    sites = []
    for node in gm.graph.find_nodes(op="call_function", target=ATTENTION):
        kw = node.kwargs
        q = node.args[0].meta["val"]
        k = node.args[1].meta["val"]
        sites.append(AttentionSite(
            node=node.name,
            layer_idx=int(kw["layer_idx"]),
            scale=float(kw["scale"]),
            causal=bool(kw.get("causal", True)),
            sliding_window=int(kw.get("sliding_window", 0)),
            softcap=float(kw.get("softcap", 0.0)),
            has_sinks=kw.get("sinks") is not None,
            num_heads=int(q.shape[1]),
            num_key_value_heads=int(k.shape[1]),
            head_dim=int(q.shape[3]),
        ))
    return sites


def _num_layers(model: torch.nn.Module) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.num_hidden_layers)


def _random_tokens(model: torch.nn.Module, batch: int, seq: int, gen: torch.Generator):
    """(input_ids, position_ids), both (batch, seq), on the model's device; ids drawn on the CPU
    from `gen`, so a seed gives the same tokens on any device."""
    embeddings = model.get_input_embeddings()
    vocab, device = int(embeddings.num_embeddings), embeddings.weight.device
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    return ids, torch.arange(seq, device=device).unsqueeze(0).expand(batch, seq).contiguous()


def capture(
    model: torch.nn.Module,
    *,
    max_batch: int,
    max_seq_len: int,
    example_batch: int = 2,
    example_seq_len: int = 8,
) -> tuple[ExportedProgram, CaptureRecord]:
    """Export `model` (an HF causal LM, eval mode) to an ExportedProgram with dynamic batch in
    [1, max_batch] and sequence in [1, max_seq_len]; see the module docstring for its interface.

    With attn_implementation "graphgen" the graph must hold exactly one canonical attention node
    per layer (else CaptureError). With another implementation (e.g. "sdpa") the record lists no
    sites and `graphgen.passes.canonicalize` is the way to the canonical form.
    """
    config = model.config
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None and max_seq_len > max_pos:
        raise CaptureError(
            f"max_seq_len {max_seq_len} exceeds the model's max_position_embeddings ({max_pos}); "
            f"set limits.max_model_len to at most {max_pos}"
        )
    if max_batch < 1 or max_seq_len < 1:
        raise CaptureError(f"max_batch ({max_batch}) and max_seq_len ({max_seq_len}) must be >= 1")
    # Example sizes must not be 0/1 (export specializes on them) and must sit inside the ranges.
    eb = max(2, min(example_batch, max_batch))
    es = max(2, min(example_seq_len, max_seq_len))
    input_ids, position_ids = _random_tokens(model, eb, es, torch.Generator().manual_seed(0))
    batch = Dim("batch", min=1, max=max(max_batch, 2))
    seq = Dim("seq", min=1, max=max(max_seq_len, 2))
    shapes = {"input_ids": {0: batch, 1: seq}, "position_ids": {0: batch, 1: seq}}

    model.eval()
    with torch.no_grad():
        ep = torch.export.export(_Logits(model), (input_ids, position_ids), dynamic_shapes=shapes, strict=False)
    # transformers' mask preprocessing leaves shape-only work (packed-sequence detection) that the
    # no-mask function never reads; drop it so passes see only what computes the logits.
    ep.graph.eliminate_dead_code()
    ep.graph_module.recompile()

    sites = attention_sites(ep.graph_module)
    record = CaptureRecord(
        attention=sites,
        num_layers=_num_layers(model),
        dims={"batch": (1, max_batch), "seq": (1, max_seq_len)},
    )
    if getattr(config, "_attn_implementation", None) == NAME:
        layers = [s.layer_idx for s in sites]
        if layers != list(range(record.num_layers)):
            raise CaptureError(
                f"expected one graphgen.attention per layer (layers 0..{record.num_layers - 1}) but found layers "
                f"{layers}: part of {type(model).__name__} bypasses transformers' AttentionInterface"
            )
    return ep, record


@contextmanager
def attn_implementation(model: torch.nn.Module, name: str) -> Iterator[torch.nn.Module]:
    """Temporarily run `model` with another attention implementation (e.g. "eager" as reference)."""
    before = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.set_attn_implementation(before)


def max_abs_error_vs_eager(
    ep: ExportedProgram,
    model: torch.nn.Module,
    sizes: Sequence[tuple[int, int]] = ((1, 5), (3, 11)),
    *,
    reference: str = "eager",
    seed: int = 0,
) -> float:
    """Run the exported program and the HF model with `reference` attention on random tokens of
    each (batch, seq) size; return the largest |logits difference| (fp32: expect ~1e-6)."""
    gen = torch.Generator().manual_seed(seed)
    module = ep.module()
    worst = 0.0
    with torch.no_grad(), attn_implementation(model, reference):
        for b, s in sizes:
            ids, pos = _random_tokens(model, b, s, gen)
            got = module(ids, pos)
            want = model(input_ids=ids, position_ids=pos, use_cache=False).logits
            worst = max(worst, (got.float() - want.float()).abs().max().item())
    return worst
