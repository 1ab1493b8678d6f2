"""graphgen::packed_causal_attention: the CPU kernel compiled prefill graphs call for the packed
PFA step, and its masked ATen form, against the independent per-head reference in tests/naive.py."""
from __future__ import annotations

import pytest
import torch

import graphgen.ops  # noqa: F401
from graphgen.ops import cpu_kernels
from graphgen.ops.packed_causal import masked_packed_causal
from tests.naive import naive_attention

op = torch.ops.graphgen.packed_causal_attention
needs_kernel = pytest.mark.skipif(not cpu_kernels.available(), reason="no AVX2 or no C++ compiler here")


def _case(lens, t, n, nkv, d, dtype, seed=0):
    """Packed q (T, N, D), k, v (T, Nkv, D), cu_seq_lens, and the reference (T, N, D): each
    sequence alone through the naive attention, tokens past the last end zero."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(t, n, d, generator=gen).to(dtype)
    k = torch.randn(t, nkv, d, generator=gen).to(dtype)
    v = torch.randn(t, nkv, d, generator=gen).to(dtype)
    expected = torch.zeros(t, n, d, dtype=torch.float64)
    start = 0
    for length in lens:
        if length:
            part = slice(start, start + length)
            causal = torch.ones(length, length, dtype=torch.bool).tril()
            out, _ = naive_attention(*(x[part].transpose(0, 1)[None] for x in (q, k, v)), scale=d ** -0.5,
                                     allowed=causal)
            expected[part] = out[0].transpose(0, 1)
        start += length
    return q, k, v, torch.tensor(lens, dtype=torch.int64).cumsum(0), expected


CASES = [  # lens, T (past sum(lens): padding), n, nkv, d
    ([158] * 3, 474, 12, 4, 64),  # bench-125m's heads
    ([5, 0, 30, 1], 40, 4, 2, 16),  # an empty sequence, a one-token one, padding after
    ([17], 17, 8, 8, 24),  # MHA, a head dim not a multiple of 8
    ([2, 3], 5, 6, 1, 32),  # MQA
]


@needs_kernel
@pytest.mark.parametrize("lens,t,n,nkv,d", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_each_sequence_alone(lens, t, n, nkv, d, dtype):
    q, k, v, ends, expected = _case(lens, t, n, nkv, d, dtype)
    out = op(q, k, v, ends, d ** -0.5)
    assert out.dtype == dtype and out.shape == (t, n, d) and out.is_contiguous()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    assert out[sum(lens):].abs().max() == 0 if t > sum(lens) else True


@pytest.mark.parametrize("lens,t,n,nkv,d", CASES)
def test_masked_form_matches_each_sequence_alone(lens, t, n, nkv, d):
    q, k, v, ends, expected = _case(lens, t, n, nkv, d, torch.float32)
    torch.testing.assert_close(masked_packed_causal(q, k, v, ends, scale=d ** -0.5).double(), expected,
                               rtol=1e-5, atol=1e-5)


@needs_kernel
def test_strided_inputs_and_int32_lengths():
    """q, k, v as the prefill graph hands them: slices of one fused projection (T, N + 2 Nkv, D)."""
    lens, t, n, nkv, d = [9, 4], 15, 4, 2, 16
    q, k, v, ends, expected = _case(lens, t, n, nkv, d, torch.float32, seed=3)
    qkv = torch.cat([q, k, v], dim=1)
    views = qkv[:, :n], qkv[:, n:n + nkv], qkv[:, n + nkv:]
    assert not views[0].is_contiguous()
    out = op(*views, ends.to(torch.int32), d ** -0.5)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_bad_lengths_say_what_is_wrong():
    q, k, v = torch.randn(6, 2, 8), torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    with pytest.raises(RuntimeError, match="non-decreasing ends within the 6 tokens; entry 1 is 2"):
        op(q, k, v, torch.tensor([4, 2]), 1.0)
    with pytest.raises(RuntimeError, match="entry 0 is 7"):
        op(q, k, v, torch.tensor([7]), 1.0)


def test_mismatched_shapes_and_dtypes_are_refused_before_the_kernel():
    q = torch.randn(6, 4, 8)
    with pytest.raises(ValueError, match="does not fit key"):
        op(q, torch.randn(6, 3, 8), torch.randn(6, 3, 8), torch.tensor([6]), 1.0)
    with pytest.raises(ValueError, match="share a dtype"):
        op(q, torch.randn(6, 2, 8).bfloat16(), torch.randn(6, 2, 8), torch.tensor([6]), 1.0)
    with pytest.raises(ValueError, match="int32 or int64"):
        op(q, torch.randn(6, 2, 8), torch.randn(6, 2, 8), torch.tensor([6.0]), 1.0)
