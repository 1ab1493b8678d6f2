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

`graphgen::gemv_linear2(x, w0, w1)` and `graphgen::gemv_linear3(x, w0, w1, w2)` are the same
linear for 2 or 3 weights that read one x (a layer's gate and up projections; q, k and v), run as
one pass: x packed once, one fork of the threads, work shared over all the weights' rows, and the
prefetch running from one weight into the next (docs/performance.md). Compiled CPU graphs call them
where sibling linears share their input (ops/decompositions.py).

`graphgen::gemv_gated(x, gate, up)` is a gated MLP's first half, silu(x @ gate.T) * (x @ up.T), in
one pass: each group of output columns runs the same rows of both weights and writes their product,
so the up projection's output and the elementwise kernel after it are never made. gate and up are
rounded to the dtype before the product, which is rounded once, as the two linears and Inductor's
fused silu-mul kernel round them.
"""
from __future__ import annotations

import torch

from . import cpu_kernels

DTYPES = (torch.float32, torch.bfloat16)


@torch.library.custom_op("graphgen::gemv_linear", mutates_args=())
def gemv_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ weight (N, K).T -> (..., N), on the CPU, both float32 or both bfloat16."""
    return _linears("gemv_linear", x, weight)[0]


@torch.library.custom_op("graphgen::gemv_linear2", mutates_args=())
def gemv_linear2(x: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x @ w0.T, x @ w1.T) in one pass: `gemv_linear` for two weights of one K."""
    return _linears("gemv_linear2", x, w0, w1)


@torch.library.custom_op("graphgen::gemv_linear3", mutates_args=())
def gemv_linear3(x: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor,
                 w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x @ w0.T, x @ w1.T, x @ w2.T) in one pass: `gemv_linear` for three weights of one K."""
    return _linears("gemv_linear3", x, w0, w1, w2)


@torch.library.custom_op("graphgen::gemv_gated", mutates_args=())
def gemv_gated(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T) -> (..., N): gate and up (N, K), one pass over both."""
    for weight in (gate, up):
        _check("gemv_gated", x, weight)
    if gate.shape != up.shape:
        raise ValueError(f"gemv_gated: gate and up of one shape expected, got {tuple(gate.shape)} and "
                         f"{tuple(up.shape)}")
    if not cpu_kernels.available():
        return torch.nn.functional.silu(torch.nn.functional.linear(x, gate)) * torch.nn.functional.linear(x, up)
    return cpu_kernels.call("gemv_gated", [x, gate, up], outputs=1)


def _linears(op: str, x: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    for weight in weights:
        _check(op, x, weight)
    if not cpu_kernels.available():
        return tuple(torch.nn.functional.linear(x, weight) for weight in weights)
    out = cpu_kernels.call(op, [x, *weights], outputs=len(weights))
    return out if isinstance(out, tuple) else (out,)


def _check(op: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.device.type != "cpu" or weight.device.type != "cpu":
        raise ValueError(f"{op}: CPU tensors only, got x on {x.device}, weight on {weight.device}")
    if x.dtype != weight.dtype or x.dtype not in DTYPES:
        raise ValueError(f"{op}: x and weight both float32 or both bfloat16, got {x.dtype} and {weight.dtype}")
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{op}: x (..., K) and weight (N, K) expected, got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")


def _fake(x, *weights):
    return tuple(x.new_empty((*x.shape[:-1], weight.shape[0])) for weight in weights)


gemv_linear.register_fake(lambda x, weight: _fake(x, weight)[0])
gemv_linear2.register_fake(_fake)
gemv_linear3.register_fake(_fake)
gemv_gated.register_fake(lambda x, gate, up: _fake(x, gate)[0])
