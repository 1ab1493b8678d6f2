"""`graphgen::greedy_head(x, weight, packed, norms) -> tokens`: argmax(x @ weight.T, dim=-1) for an fp32 LM
head, ties to the lowest id, without computing every logit exactly (csrc/greedy_head.cpp).

A greedy step needs only each row's argmax. The kernel computes approximate logits from a bf16 copy of
the weight (`pack_head`, made once) and x rounded to bf16, with AVX512-BF16 dot products (half the
bytes of the fp32 head and twice its products per cycle), bounds each one's distance to the exact
logit, and computes exactly, in fp32, only the ids whose bound reaches the best lower bound: the
argmax is always among them. Rows of x that are not finite run every logit exactly.

`supported()` says whether it runs here (graphgen's CPU kernels, a CPU with AVX512-BF16); where it
does not, callers compute the logits and take their argmax.
"""
from __future__ import annotations

import math

import torch

from . import cpu_kernels

TILE = 16  # vocab rows per packed tile
BLOCK_TILES = 3  # tiles the kernel runs at a time; the packed tiles are a multiple of it


@torch.library.custom_op("graphgen::greedy_head", mutates_args=())
def greedy_head(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """Token ids (R,) int64: argmax over the V ids of x (R, K) @ weight (V, K).T, both float32, the
    lowest id on ties and the first NaN where a row has one. `packed` and `norms` come from
    `pack_head(weight)`."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"greedy_head: x (R, K) and weight (V, K) expected, got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if not supported():
        raise RuntimeError("greedy_head: needs graphgen's CPU kernels on a CPU with AVX512-BF16 (see supported())")
    return cpu_kernels.call("greedy_head", [x.contiguous(), weight, packed, norms])


@greedy_head.register_fake
def _(x, weight, packed, norms):
    return x.new_empty((x.shape[0],), dtype=torch.int64)


def supported() -> bool:
    """Whether the kernel runs here."""
    return cpu_kernels.greedy_head_supported()


def packed_shape(vocab: int, hidden: int) -> tuple[int, int, int, int]:
    """The shape `pack_head` fills for a (vocab, hidden) weight: (tiles, ceil(hidden / 2), 16, 2)."""
    tiles = math.ceil(vocab / (TILE * BLOCK_TILES)) * BLOCK_TILES
    return tiles, (hidden + 1) // 2, TILE, 2


def pack_head(weight: torch.Tensor, packed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed, norms) for `greedy_head`: the weight rounded to bf16 (to nearest even), zero-padded to
    whole tiles and an even hidden size, laid out per tile of 16 ids as (hidden / 2, 16, 2) (each id's
    pairs of neighbouring columns, what one bf16 dot product takes), and each row's L2 norm rounded
    up (zero on padding). `packed`: a bfloat16 buffer of `packed_shape` to fill (new if None)."""
    if weight.dim() != 2 or weight.dtype != torch.float32:
        raise ValueError(f"pack_head: a (V, K) float32 weight expected, got {tuple(weight.shape)} {weight.dtype}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("pack_head: the weight has values that are not finite")
    vocab, hidden = weight.shape
    shape = packed_shape(vocab, hidden)
    if packed is None:
        packed = torch.empty(shape, dtype=torch.bfloat16)
    elif tuple(packed.shape) != shape or packed.dtype != torch.bfloat16 or not packed.is_contiguous():
        raise ValueError(f"pack_head: packed must be a contiguous {shape} bfloat16 tensor")
    tiles, half = shape[0], shape[1]
    padded = torch.zeros(tiles * TILE, 2 * half, dtype=torch.bfloat16)
    padded[:vocab, :hidden] = weight
    packed.copy_(padded.view(tiles, TILE, half, 2).transpose(1, 2))
    norms = torch.zeros(tiles * TILE, dtype=torch.float32)
    norms[:vocab] = torch.nextafter(weight.double().norm(dim=1).float(), torch.tensor(math.inf))
    return packed, norms
