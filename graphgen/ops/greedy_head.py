"""`graphgen::greedy_head(x, weight, packed, rows) -> tokens`: argmax(x @ weight.T, dim=-1) for an fp32 or
bf16 LM head, ties to the lowest id, without computing every logit exactly (csrc/greedy_head.cpp).
bf16 logits are the fp32 sums rounded to bf16, as the linear kernel returns them; ties among the
rounded values go to the lowest id.

A greedy step needs only each row's argmax. The kernel computes approximate logits from an int8 copy
of the weight (`pack_head`, made once: each row scaled by its largest magnitude) and x quantized per
row, with AVX512-VNNI dot products summed exactly in int32 (a quarter of the fp32 head's bytes, four
times its products per cycle), bounds each one's distance to the exact logit, and computes exactly, in
fp32, only the ids whose bound reaches the best lower bound: the argmax is always among them. Rows of x
that are not finite run every logit exactly.

`supported()` says whether it runs here (graphgen's CPU kernels, a CPU with AVX512-VNNI); where it
does not, callers compute the logits and take their argmax.
"""
from __future__ import annotations

import math

import torch

from . import cpu_kernels

TILE = 16  # vocab rows per packed tile
BLOCK_TILES = 3  # tiles the kernel runs at a time; the packed tiles are a multiple of it
LANE = 4  # int8 weights a 32-bit lane of the dot product sums


@torch.library.custom_op("graphgen::greedy_head", mutates_args=())
def greedy_head(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Token ids (R,) int64: argmax over the V ids of x (R, K) @ weight (V, K).T, both float32 or both
    bfloat16, the lowest id on ties and the first NaN where a row has one. `packed` and `rows` come
    from `pack_head(weight)`."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"greedy_head: x (R, K) and weight (V, K) expected, got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if not supported():
        raise RuntimeError("greedy_head: needs graphgen's CPU kernels on a CPU with AVX512-VNNI (see supported())")
    return cpu_kernels.call("greedy_head", [x.contiguous(), weight, packed, rows])


@greedy_head.register_fake
def _(x, weight, packed, rows):
    return x.new_empty((x.shape[0],), dtype=torch.int64)


def supported() -> bool:
    """Whether the kernel runs here."""
    return cpu_kernels.greedy_head_supported()


def packed_shape(vocab: int, hidden: int) -> tuple[int, int, int, int]:
    """The shape `pack_head` fills for a (vocab, hidden) weight: (tiles, ceil(hidden / 4), 16, 4)."""
    tiles = math.ceil(vocab / (TILE * BLOCK_TILES)) * BLOCK_TILES
    return tiles, -(-hidden // LANE), TILE, LANE


def pack_head(weight: torch.Tensor, packed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed, rows) for `greedy_head`. packed: each weight row n quantized to int8, q = round(w / s_n)
    with s_n = max |w_n| / 127, zero-padded to whole tiles and a multiple of 4 columns, laid out per
    tile of 16 ids as (hidden / 4, 16, 4) (each id's runs of 4 columns, what one int8 dot product
    lane takes). rows (3, ids padded): s_n, s_n * sum |q_n| (rounded up) and sum q_n; zero on padding.
    `packed`: an int8 buffer of `packed_shape` to fill (new if None)."""
    if weight.dim() != 2 or weight.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"pack_head: a (V, K) float32 or bfloat16 weight expected, got {tuple(weight.shape)} "
                         f"{weight.dtype}")
    vocab, hidden = weight.shape
    if hidden >= 1 << 17:
        raise ValueError(f"pack_head: hidden size up to {(1 << 17) - 1}, got {hidden}")
    if not cpu_kernels.available():
        raise RuntimeError("pack_head: needs graphgen's CPU kernels (see graphgen doctor)")
    shape = packed_shape(vocab, hidden)
    if packed is None:
        packed = torch.empty(shape, dtype=torch.int8)
    elif tuple(packed.shape) != shape or packed.dtype != torch.int8 or not packed.is_contiguous():
        raise ValueError(f"pack_head: packed must be a contiguous {shape} int8 tensor")
    rows = torch.empty(3, shape[0] * TILE, dtype=torch.float32)
    # one parallel pass, the finiteness check included (torch's isfinite().all() alone: ~7x as long)
    if not cpu_kernels.greedy_head_pack(weight.contiguous(), packed, rows):
        raise ValueError("pack_head: the weight has values that are not finite")
    return packed, rows
