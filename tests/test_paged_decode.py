"""graphgen::paged_decode_attention: the CPU kernel compiled decode graphs call for the paged IFA
step, and its ATen form, against the independent per-head reference in tests/naive.py."""
from __future__ import annotations

import pytest
import torch

import graphgen.ops  # noqa: F401
from graphgen.ops import cpu_kernels
from graphgen.ops.paged_decode import aten_paged_decode
from tests.naive import naive_attention, page_kv

op = torch.ops.graphgen.paged_decode_attention
needs_kernel = pytest.mark.skipif(not cpu_kernels.available(), reason="no AVX2 or no C++ compiler here")


def _case(b, n, nkv, d, bs, lens, dtype, bnsd, seed=0):
    """Paged caches as the op takes them ((NB, bs, Nkv, D) views of either pool layout), plus the
    naive reference's output (B, N, D)."""
    gen = torch.Generator().manual_seed(seed)
    s = max(max(lens), 1)
    k = torch.randn(b, nkv, s, d, generator=gen).to(dtype)
    v = torch.randn(b, nkv, s, d, generator=gen).to(dtype)
    key, table = page_kv(k, bs, bnsd, torch.Generator().manual_seed(seed + 1))
    value, value_table = page_kv(v, bs, bnsd, torch.Generator().manual_seed(seed + 1))
    assert torch.equal(table, value_table)  # same generator state: same blocks for K and V
    q = torch.randn(b, n, d, generator=gen).to(dtype)
    if bnsd:
        caches = [c.transpose(1, 2) for c in (key, value)]
    else:
        caches = [c.view(c.shape[0], bs, nkv, d) for c in (key, value)]
    lens_t = torch.tensor(lens, dtype=torch.int64)
    visible = torch.arange(s).view(1, 1, 1, s) < lens_t.view(b, 1, 1, 1)
    expected, _ = naive_attention(q[:, :, None], k, v, scale=d ** -0.5, allowed=visible)
    return q, caches, table, lens_t, expected[:, :, 0]



CASES = [  # b, n, nkv, d, block_size, lens
    (1, 12, 4, 64, 16, [192]),  # bench-125m's decode
    (3, 8, 2, 17, 4, [37, 1, 0]),  # ragged D, a one-token row and an empty one
    (2, 4, 4, 128, 128, [130, 255]),  # MHA, NPU-sized blocks
    (4, 6, 1, 32, 16, [16, 17, 5, 48]),  # MQA, lengths on and just past block edges
    (2, 10, 2, 48, 16, [33, 7]),  # 5 heads per KV head (a group of 3, then 2), D not a multiple of 32
    (1, 4, 2, 64, 16, [70]),  # 2 heads per KV head
]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bnsd", [False, True], ids=["BSH-pool", "BNSD-pool"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}n{c[1]}kv{c[2]}d{c[3]}bs{c[4]}")
def test_kernel_matches_naive_reference(case, bnsd, dtype):
    b, n, nkv, d, bs, lens = case
    q, caches, table, lens_t, expected = _case(b, n, nkv, d, bs, lens, dtype, bnsd)
    out = op(q, *caches, table, lens_t, d ** -0.5)
    assert out.shape == (b, n, d) and out.dtype == dtype and out.is_contiguous()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out.double(), expected, **tol)
    assert all(out[i].abs().max() == 0 for i in range(b) if lens[i] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES[:2], ids=lambda c: f"b{c[0]}n{c[1]}kv{c[2]}d{c[3]}bs{c[4]}")
def test_aten_form_matches_naive_reference(case, dtype):
    b, n, nkv, d, bs, lens = case
    q, caches, table, lens_t, expected = _case(b, n, nkv, d, bs, lens, dtype, False)
    out = aten_paged_decode(q, *caches, table, lens_t, d ** -0.5)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out.double(), expected, **tol)


@needs_kernel
def test_int32_lengths_and_int64_table_and_threads():
    q, caches, table, lens_t, expected = _case(2, 8, 2, 64, 16, [100, 33], torch.float32, False, seed=3)
    out = op(q, *caches, table.long(), lens_t.int(), 64 ** -0.5)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    try:
        cpu_kernels.set_num_threads(1)
        one = op(q, *caches, table, lens_t, 64 ** -0.5)
    finally:
        cpu_kernels.set_num_threads(torch.get_num_threads())
    assert torch.equal(one, out)  # each (sequence, KV head) is one thread's work


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tasks_per_sequence_equal_tasks_per_head(dtype):
    """From 2 sequences per thread on (BSH pool), a task runs all KV heads of a sequence: the same
    arithmetic per head as one task per head, so the same bits, and empty rows stay zero."""
    lens = [40, 0, 17, 1, 96, 33, 16, 70]
    q, caches, table, lens_t, expected = _case(8, 12, 4, 64, 16, lens, dtype, False, seed=5)
    try:
        cpu_kernels.set_num_threads(8)  # 1 sequence per thread: a task per (sequence, KV head)
        per_head = op(q, *caches, table, lens_t, 0.125)
        cpu_kernels.set_num_threads(2)  # 4 per thread: a task per sequence
        per_sequence = op(q, *caches, table, lens_t, 0.125)
    finally:
        cpu_kernels.set_num_threads(torch.get_num_threads())
    assert torch.equal(per_sequence, per_head)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(per_sequence.double(), expected, **tol)
    assert per_sequence[1].abs().max() == 0


@needs_kernel
def test_bad_tables_and_lengths_say_what_is_wrong():
    q, caches, table, lens_t, _ = _case(1, 4, 2, 16, 4, [9], torch.float32, False)
    num_blocks = caches[0].shape[0]
    bad = table.clone()
    bad[0, 1] = num_blocks + 5
    with pytest.raises(RuntimeError, match=f"block table entry {num_blocks + 5} is outside the cache's {num_blocks}"):
        op(q, *caches, bad, lens_t, 0.25)
    bad[0, 1] = -1  # an unset entry inside the sequence's length
    with pytest.raises(RuntimeError, match=f"block table entry -1 is outside the cache's {num_blocks}"):
        op(q, *caches, bad, lens_t, 0.25)
    with pytest.raises(RuntimeError, match="sequence 0's length exceeds its block table"):
        op(q, *caches, table, torch.tensor([table.shape[1] * 4 + 1]), 0.25)


def test_bad_shapes_and_dtypes_say_what_is_wrong():
    q, caches, table, lens_t, _ = _case(2, 4, 2, 16, 4, [9, 3], torch.float32, False)
    with pytest.raises(ValueError, match=r"query \(2, 4, 8\) does not fit key_cache"):
        op(q[..., :8], *caches, table, lens_t, 0.25)
    with pytest.raises(ValueError, match="query and caches share a dtype"):
        op(q.bfloat16(), *caches, table, lens_t, 0.25)
    with pytest.raises(ValueError, match="block_table must be int32 or int64"):
        op(q, *caches, table.float(), lens_t, 0.25)


def test_fake_kernel_gives_the_output_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = op(torch.empty(3, 8, 16), torch.empty(10, 4, 2, 16), torch.empty(10, 4, 2, 16),
                 torch.empty(3, 5, dtype=torch.int32), torch.empty(3, dtype=torch.int64), 0.25)
    assert out.shape == (3, 8, 16)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_caches_strided_along_head_dim(dtype):
    """A cache whose head dim is not contiguous (widened row by row inside the kernel)."""
    q, caches, table, lens_t, expected = _case(2, 6, 3, 24, 8, [29, 8], dtype, False, seed=5)
    strided = [c.transpose(2, 3).contiguous().transpose(2, 3) for c in caches]  # (NB, bs, Nkv, D), D stride Nkv
    assert strided[0].stride(3) == 3
    out = op(q, *strided, table, lens_t, 24 ** -0.5)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out.double(), expected, **tol)


def _rows_case(seq_lens, rows, n, nkv, d, bs, dtype, seed=0):
    """Sequences of `seq_lens` paged as in _case (BSH pool); `rows`: a (sequence, length) per
    query row, the form a mixed step's prompt chunk takes (ops/paged_decode.py, token_rows):
    consecutive rows of one sequence, lengths growing by one."""
    gen = torch.Generator().manual_seed(seed)
    s = max(seq_lens)
    k = torch.randn(len(seq_lens), nkv, s, d, generator=gen).to(dtype)
    v = torch.randn(len(seq_lens), nkv, s, d, generator=gen).to(dtype)
    key, table = page_kv(k, bs, False, torch.Generator().manual_seed(seed + 1))
    value, _ = page_kv(v, bs, False, torch.Generator().manual_seed(seed + 1))
    caches = [c.view(c.shape[0], bs, nkv, d) for c in (key, value)]
    seq = torch.tensor([r[0] for r in rows])
    lens = torch.tensor([r[1] for r in rows], dtype=torch.int64)
    q = torch.randn(len(rows), n, d, generator=gen).to(dtype)
    visible = torch.arange(s).view(1, 1, 1, s) < lens.view(-1, 1, 1, 1)
    expected, _ = naive_attention(q[:, :, None], k[seq], v[seq], scale=d ** -0.5, allowed=visible)
    return q, caches, table[seq], lens, expected[:, :, 0]


def _chunk(seq, start, n):
    return [(seq, start + i + 1) for i in range(n)]


RUN_CASES = [  # seq_lens, rows, n, nkv, d, block_size
    # a mixed step: decode rows, a 48-token chunk crossing blocks, a 5-token chunk, 3 tokens (too
    # few for a run: rows), and a chunk starting at position 0
    ([90, 30, 120, 60, 16, 40], [(0, 90), (1, 30), *_chunk(2, 72, 48), (3, 60), *_chunk(4, 11, 5),
                                 *_chunk(5, 20, 3), *_chunk(5, 0, 7)], 12, 4, 64, 16),
    ([200, 33], [*_chunk(0, 150, 50), *_chunk(1, 20, 13)], 8, 2, 128, 128),  # 4 heads a KV head, big blocks
    ([70, 9], [*_chunk(0, 0, 70), *_chunk(1, 0, 9)], 4, 4, 48, 16),  # MHA, D = 48, whole prompts
    ([40], [*_chunk(0, 30, 10)], 6, 1, 32, 8),  # MQA
]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", RUN_CASES, ids=lambda c: f"rows{len(c[1])}n{c[2]}kv{c[3]}d{c[4]}bs{c[5]}")
def test_prompt_chunk_rows_match_naive_reference(case, dtype):
    """A prompt chunk's tokens (consecutive rows, one block table, lengths growing by one) run as
    panels of query rows against each key and value row; the result is still each row's own
    attention over its own length, beside ordinary rows in the same call."""
    seq_lens, rows, n, nkv, d, bs = case
    q, caches, table, lens, expected = _rows_case(seq_lens, rows, n, nkv, d, bs, dtype, seed=len(rows))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    out = op(q, *caches, table, lens, d ** -0.5)
    torch.testing.assert_close(out.double(), expected, **tol)
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(1))  # no runs: rows
    shuffled = op(q[perm], *caches, table[perm], lens[perm], d ** -0.5)
    torch.testing.assert_close(shuffled.double(), expected[perm], **tol)
