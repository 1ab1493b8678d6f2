"""`graphgen::gemv_linear(x, weight) -> x @ weight.T`: the CPU linear of compiled graphs, fp32 and bf16.

Batch-1 decode is one matrix-vector product per weight matrix, bound by how fast the weights
stream from memory. The kernel (csrc/gemv_linear.cpp: AVX2, OpenMP over bands of weight rows, each
row read once for all of x's 1-3 rows, fp32 accumulation, bf16 rounded to nearest even) is one of
graphgen's CPU kernels (ops/cpu_kernels.py): compiled graphs call its C shim directly, and this
op's eager kernel runs the same C function. 4 or more rows of x (decode at larger batches, mixed
steps, prefill: compute-bound) run panels: x transposed into panels of 16 rows, an outer-product
microkernel over 6 weight rows at a time, the weights prefetched ahead (bf16 weights widened to
fp32 a tile at a time).

Other inputs go to ATen inside the shim: strided operands (oneDNN's inner product in fp32, ATen's
mm in bf16), and bf16 past 16 rows where the CPU has AVX512-BF16, whose mm outruns the panels.
Where the kernels cannot be built, the op is ATen's linear.
"""
from __future__ import annotations

import torch

from . import cpu_kernels

DTYPES = (torch.float32, torch.bfloat16)


@torch.library.custom_op("graphgen::gemv_linear", mutates_args=())
def gemv_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ weight (N, K).T -> (..., N), on the CPU, both float32 or both bfloat16."""
    if x.device.type != "cpu" or weight.device.type != "cpu":
        raise ValueError(f"gemv_linear: CPU tensors only, got x on {x.device}, weight on {weight.device}")
    if x.dtype != weight.dtype or x.dtype not in DTYPES:
        raise ValueError(f"gemv_linear: x and weight both float32 or both bfloat16, got {x.dtype} and {weight.dtype}")
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"gemv_linear: x (..., K) and weight (N, K) expected, got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if not cpu_kernels.available():
        return torch.nn.functional.linear(x, weight)
    return cpu_kernels.call("gemv_linear", [x, weight])


@gemv_linear.register_fake
def _(x, weight):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
