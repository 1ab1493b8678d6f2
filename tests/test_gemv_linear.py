"""graphgen::gemv_linear: the fp32/bf16 CPU linear compiled graphs call as a C shim. The eager
op runs the same C function through AOTI tensor handles, so these tests check the kernel itself."""
from __future__ import annotations

import ctypes
import zipfile

import pytest
import torch

from graphgen.artifact import read_manifest
from graphgen.ops import cpu_kernels

SHIM = cpu_kernels.SHIMS["gemv_linear"][0]
needs_kernel = pytest.mark.skipif(not cpu_kernels.available(), reason="no AVX2 or no C++ compiler here")


@needs_kernel
# 1-3 rows: the GEMV. 4 or more: panels of 16 rows (a last panel of 1-8 rows takes one vector, 9-16
# two) in chunks of 8 panels (130, 300: several chunks).
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 15, 16, 17, 24, 25, 40, 63, 64, 65, 130, 300])
# ragged N (6 weight rows per kernel call, 12 per group) and K (8 lanes); K past 1024 runs in blocks
@pytest.mark.parametrize("n,k", [(37, 771), (8, 16), (2048, 768), (3, 5), (13, 2100)])
def test_matches_linear(rows, n, k):
    gen = torch.Generator().manual_seed(rows * 1000 + n + k)
    x, w = torch.randn(rows, k, generator=gen), torch.randn(n, k, generator=gen)
    y = torch.ops.graphgen.gemv_linear(x, w)
    assert y.shape == (rows, n) and y.is_contiguous()
    exact = torch.nn.functional.linear(x.double(), w.double()).float()
    # fp32 sums of k products: rounding grows with k (at k = 2100, 1.1e-4 was seen once in 3900)
    torch.testing.assert_close(y, exact, rtol=1e-5, atol=1e-4 * max(1.0, k / 1024))


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 4, 7, 16, 17, 64, 130])  # past 16: the panels on AVX2, ATen's mm with AVX512-BF16
@pytest.mark.parametrize("n,k", [(37, 771), (2048, 768), (13, 2100)])
def test_bf16_matches_fp32_accumulation_rounded(rows, n, k):
    gen = torch.Generator().manual_seed(rows + n + k)
    x = torch.randn(rows, k, generator=gen).bfloat16()
    w = torch.randn(n, k, generator=gen).bfloat16()
    y = torch.ops.graphgen.gemv_linear(x, w)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
    # fp32 sums in another order, rounded once: at most one bf16 step apart
    torch.testing.assert_close(y, torch.nn.functional.linear(x.float(), w.float()).bfloat16(), rtol=8e-3, atol=1e-2)


@needs_kernel
def test_bf16_mm_path_reads_operands_that_start_inside_their_storage():
    """Contiguous slices with a storage offset (a prefill's rows past the first): the mm path (on
    CPUs with AVX512-BF16; the panels elsewhere) views them in place, their own offset counted once."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(60, 64, generator=gen).bfloat16()[10:]  # 50 rows: past the decode rows
    w = torch.randn(40, 64, generator=gen).bfloat16()[8:]
    assert x.is_contiguous() and x.storage_offset() and w.storage_offset()
    y = torch.ops.graphgen.gemv_linear(x, w)
    torch.testing.assert_close(y, torch.nn.functional.linear(x.float(), w.float()).bfloat16(), rtol=8e-3, atol=1e-2)


@needs_kernel
def test_bf16_strided_operands_take_the_mm_path():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 96, generator=gen).bfloat16()[:, ::2]
    w = torch.randn(48, 20, generator=gen).bfloat16().T
    y = torch.ops.graphgen.gemv_linear(x, w)
    torch.testing.assert_close(y, torch.nn.functional.linear(x.float(), w.float()).bfloat16(), rtol=8e-3, atol=1e-2)


@needs_kernel
def test_leading_dims_and_strided_operands():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 64, generator=gen)  # decode's (B, S=1, H)
    w = torch.randn(24, 64, generator=gen)
    torch.testing.assert_close(torch.ops.graphgen.gemv_linear(x, w), x @ w.T, rtol=1e-5, atol=1e-5)
    x = torch.randn(3, 5, 64, generator=gen)  # 15 rows through leading dims: the panels
    torch.testing.assert_close(torch.ops.graphgen.gemv_linear(x, w), x @ w.T, rtol=1e-5, atol=1e-5)
    xs = torch.randn(3, 128, generator=gen)[:, ::2]  # strided: the shim hands it to oneDNN
    wt = torch.randn(64, 24, generator=gen).T  # a transposed weight too
    torch.testing.assert_close(torch.ops.graphgen.gemv_linear(xs, wt), xs @ wt.T, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 9, 16, 17, 64, 130, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# q, k, v-like (N 768 / 256 / 256), ragged N and fewer rows than a group; K past 1024 runs in blocks
@pytest.mark.parametrize("ns,k", [((96, 32, 32), 64), ((37, 5, 13), 771), ((7, 20), 2100), ((3, 1, 2), 16)])
def test_several_weights_in_one_pass_give_each_weights_own_result(rows, dtype, ns, k):
    """gemv_linear2/3: one pass over all weights (shared groups, prefetch from one weight into the
    next); every output is the one gemv_linear gives, bit for bit (one thread sums each output in
    the same order)."""
    gen = torch.Generator().manual_seed(rows + k + len(ns))
    x = torch.randn(rows, k, generator=gen).to(dtype)
    weights = [torch.randn(n, k, generator=gen).to(dtype) for n in ns]
    op = torch.ops.graphgen.gemv_linear2 if len(ns) == 2 else torch.ops.graphgen.gemv_linear3
    outs = op(x, *weights)
    assert len(outs) == len(ns)
    for y, w in zip(outs, weights):
        assert y.shape == (rows, w.shape[0]) and y.dtype == dtype and y.is_contiguous()
        assert torch.equal(y, torch.ops.graphgen.gemv_linear(x, w))
    exact = [torch.nn.functional.linear(x.double(), w.double()) for w in weights]
    tol = dict(rtol=1e-5, atol=1e-4 * max(1.0, k / 1024)) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-2)
    for y, want in zip(outs, exact):
        torch.testing.assert_close(y.double(), want.to(dtype).double(), **tol)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 9, 16, 17, 64, 130, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# an MLP-like N, ragged N (a last group of fewer than 12 columns, a last band of fewer than 6), K in blocks
@pytest.mark.parametrize("n,k", [(96, 64), (37, 771), (13, 2100), (3, 16)])
def test_gated_is_silu_of_gate_times_up(rows, dtype, n, k):
    """gemv_gated: the gate's and up's sums are gemv_linear's (same kernel, same order), rounded to
    the dtype, then silu(gate) * up rounded once; the silu's exp is the kernel's own (~2 ulp)."""
    gen = torch.Generator().manual_seed(rows * 7 + n + k)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    gate, up = (torch.randn(n, k, generator=gen).div(k ** 0.5).to(dtype) for _ in range(2))
    y = torch.ops.graphgen.gemv_gated(x, gate, up)
    assert y.shape == (rows, n) and y.dtype == dtype and y.is_contiguous()
    g, u = (torch.ops.graphgen.gemv_linear(x, w).float() for w in (gate, up))
    want = (torch.nn.functional.silu(g) * u).to(dtype)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-3)
    torch.testing.assert_close(y, want, **tol)


@needs_kernel
def test_gated_with_strided_operands_combines_the_two_linears():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(40, 128, generator=gen)[:, ::2]  # strided x: each linear on its own path, then the product
    gate, up = torch.randn(30, 64, generator=gen), torch.randn(64, 30, generator=gen).T
    y = torch.ops.graphgen.gemv_gated(x, gate, up)
    want = torch.nn.functional.silu(x @ gate.T) * (x @ up.T)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"gate and up of one shape expected, got \(30, 64\) and \(31, 64\)"):
        torch.ops.graphgen.gemv_gated(x, gate, torch.randn(31, 64))


@needs_kernel
def test_several_weights_with_a_strided_one_run_each_on_its_own_path():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 64, generator=gen)
    dense, strided = torch.randn(24, 64, generator=gen), torch.randn(64, 40, generator=gen).T  # a transposed weight
    a, b = torch.ops.graphgen.gemv_linear2(x, dense, strided)
    torch.testing.assert_close(a, x @ dense.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b, x @ strided.T, rtol=1e-5, atol=1e-5)
    xs = torch.randn(5, 128, generator=gen)[:, ::2]  # a strided x: every weight on its own path
    for y, w in zip(torch.ops.graphgen.gemv_linear3(xs, dense, dense[:7], strided), (dense, dense[:7], strided)):
        torch.testing.assert_close(y, xs @ w.T, rtol=1e-5, atol=1e-5)


def test_bad_calls_say_what_is_wrong():
    with pytest.raises(ValueError, match=r"x \(\.\.\., K\) and weight \(N, K\) expected, got \(2, 3\) and \(4, 5\)"):
        torch.ops.graphgen.gemv_linear(torch.randn(2, 3), torch.randn(4, 5))
    with pytest.raises(ValueError, match="both float32 or both bfloat16, got torch.bfloat16 and torch.float32"):
        torch.ops.graphgen.gemv_linear(torch.randn(2, 3, dtype=torch.bfloat16), torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"gemv_linear3: x \(\.\.\., K\) and weight \(N, K\) expected, got \(2, 3\) and \(4, 5\)"):
        torch.ops.graphgen.gemv_linear3(torch.randn(2, 3), torch.randn(4, 3), torch.randn(4, 5), torch.randn(4, 3))


def test_fake_kernel_gives_the_output_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        y = torch.ops.graphgen.gemv_linear(torch.empty(5, 1, 32), torch.empty(7, 32))
        ys = torch.ops.graphgen.gemv_linear3(torch.empty(5, 1, 32), torch.empty(7, 32), torch.empty(3, 32),
                                             torch.empty(9, 32))
        h = torch.ops.graphgen.gemv_gated(torch.empty(5, 1, 32), torch.empty(7, 32), torch.empty(7, 32))
    assert y.shape == (5, 1, 7) and h.shape == (5, 1, 7)
    assert [t.shape for t in ys] == [(5, 1, 7), (5, 1, 3), (5, 1, 9)]


@needs_kernel
def test_thread_count_does_not_change_results():
    gen = torch.Generator().manual_seed(1)
    for n in (300, 13):  # 13 rows: 2 groups of 12, so 3 or 5 threads leave shares empty (all stolen)
        w = torch.randn(n, 256, generator=gen)
        more = torch.randn(n // 2 + 1, 256, generator=gen), torch.randn(5, 256, generator=gen)
        for rows in (1, 11, 300):  # the GEMV, one panel, several chunks of panels
            x = torch.randn(rows, 256, generator=gen)
            default = torch.ops.graphgen.gemv_linear(x, w)
            several = torch.ops.graphgen.gemv_linear3(x, w, *more)
            for threads in (1, 3, 5):
                try:
                    cpu_kernels.set_num_threads(threads)
                    other = torch.ops.graphgen.gemv_linear(x, w)
                    others = torch.ops.graphgen.gemv_linear3(x, w, *more)
                finally:
                    cpu_kernels.set_num_threads(torch.get_num_threads())
                assert torch.equal(other, default)  # each output is one thread's sum, whichever thread
                assert all(torch.equal(a, b) for a, b in zip(others, several))


@needs_kernel
def test_build_is_cached_per_source_and_torch(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHGEN_CACHE_DIR", str(tmp_path))
    first = cpu_kernels._build()
    assert first.is_relative_to(tmp_path) and first.exists()
    stamp = first.stat().st_mtime_ns
    assert cpu_kernels._build() == first and first.stat().st_mtime_ns == stamp  # reused, not rebuilt
    lib = ctypes.CDLL(str(first))
    assert hasattr(lib, SHIM)


@needs_kernel
def test_concurrent_builders_build_once(tmp_path, monkeypatch):
    """Forked compile workers and parallel test runs may all need the library at once: one builds
    (under the lock file), the others wait and load the same file."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("GRAPHGEN_CACHE_DIR", str(tmp_path))
    compiles = []
    run = cpu_kernels._run
    monkeypatch.setattr(cpu_kernels, "_run", lambda command: (compiles.append(command), run(command)))
    with ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda _: cpu_kernels._build(), range(3)))
    assert len(set(paths)) == 1 and paths[0].exists()
    assert len(compiles) == len(cpu_kernels.SOURCES) + 1  # each source once, one link
    assert sorted(p.name for p in paths[0].parent.iterdir()) == ["build.lock", cpu_kernels.LIBRARY]


@needs_kernel
def test_compiled_tiny_graphs_call_the_shim(tiny_artifact):
    """The Inductor artifact's graphs call the kernel directly (no proxy executor round trip)."""
    with zipfile.ZipFile(tiny_artifact / "graphs" / "decode.pt2") as z:
        wrapper = next(z.read(n).decode() for n in z.namelist() if n.endswith("wrapper.cpp"))
    assert f"{SHIM}(" in wrapper
    # each layer's q, k, v projections and its gated MLP's silu(gate) * up: one call each
    layers = read_manifest(tiny_artifact).kv.num_layers
    assert wrapper.count(f"{cpu_kernels.SHIMS['gemv_linear3'][0]}(buf") == layers
    assert wrapper.count(f"{cpu_kernels.SHIMS['gemv_gated'][0]}(buf") == layers
    assert "proxy_executor_call_function" not in wrapper
