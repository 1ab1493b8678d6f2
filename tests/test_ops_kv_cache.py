"""KV writes: npu_scatter_nd_update_ / scatter_update_ / graphgen::kv_cache_scatter_ vs naive loops,
checks, and the compile pipeline: export with a dynamic token count, torch.compile(fullgraph=True),
AOTInductor package with the write visible in the caller's cache tensor; the alias-returning
torch_npu forms are refused by torch.compile (the reason kv_cache_scatter_ exists)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import graphgen.ops  # noqa: F401
import graphgen.ops.kv_cache  # noqa: F401

nd = torch.ops.graphgen.npu_scatter_nd_update_
axis_op = torch.ops.graphgen.scatter_update_
graph_op = torch.ops.graphgen.kv_cache_scatter_


def naive_nd(cache, indices, updates):
    out = cache.clone()
    k = indices.shape[-1]
    flat_idx = indices.reshape(-1, k).tolist()
    flat_upd = updates.reshape(len(flat_idx), *cache.shape[k:])
    for row, upd in zip(flat_idx, flat_upd):
        out[tuple(row)] = upd
    return out


def naive_axis(data, indices, updates, axis):
    out = data.clone()
    ax = axis % data.dim()
    for b, start in enumerate(indices.reshape(-1).tolist()):
        for e in range(updates.shape[ax]):
            dst = [b] + [slice(None)] * (data.dim() - 1)
            src = [b] + [slice(None)] * (data.dim() - 1)
            dst[ax], src[ax] = start + e, e
            out[tuple(dst)] = updates[tuple(src)]
    return out


@settings(max_examples=40, deadline=None)
@given(num_blocks=st.integers(1, 5), block_size=st.integers(1, 4), hidden=st.integers(1, 6),
       tokens=st.integers(0, 10), k=st.sampled_from([1, 2, 3]), idx_dtype=st.sampled_from([torch.int32, torch.int64]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int8]),
       use_graph_op=st.booleans(), seed=st.integers(0, 999))
def test_scatter_nd_matches_naive(num_blocks, block_size, hidden, tokens, k, idx_dtype, dtype, use_graph_op, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (num_blocks, block_size, hidden)
    cache = (torch.randn(shape, generator=gen) * 10).to(dtype)
    slots = torch.randperm(num_blocks * block_size * hidden, generator=gen)[:tokens]  # unique targets
    full = torch.stack([slots // (block_size * hidden), (slots // hidden) % block_size, slots % hidden], -1)
    indices = full[:, :k].unique(dim=0).to(idx_dtype)  # no duplicate rows: the result is defined
    updates = (torch.randn(indices.shape[0], *shape[k:], generator=gen) * 10).to(dtype)
    want = naive_nd(cache, indices, updates)
    if use_graph_op:
        assert graph_op(cache, indices, updates) is None
    else:
        assert nd(cache, indices, updates) is cache
    assert torch.equal(cache, want)


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), n=st.integers(1, 3), s=st.integers(1, 6), d=st.integers(1, 4), frac=st.floats(0, 1),
       axis=st.sampled_from([-2, 2, -1, 1]), idx_dtype=st.sampled_from([torch.int32, torch.int64]),
       seed=st.integers(0, 999))
def test_scatter_update_matches_naive(b, n, s, d, frac, axis, idx_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    data = torch.randn(b, n, s, d, generator=gen)
    ax = axis % 4
    e = 1 + int(frac * (data.shape[ax] - 1))
    upd_shape = list(data.shape)
    upd_shape[ax] = e
    updates = torch.randn(upd_shape, generator=gen)
    indices = torch.randint(0, data.shape[ax] - e + 1, (b,), generator=gen).to(idx_dtype)
    want = naive_axis(data, indices, updates, axis)
    assert axis_op(data, indices, updates, axis) is data
    assert torch.equal(data, want)


def test_scatter_update_seed_doc_example():
    data = torch.tensor([[[[1.0] * 8, [2.0] * 8]]])
    out = axis_op(data, torch.tensor([1]), torch.tensor([[[[3.0] * 8]]]), -2)
    assert torch.equal(out, torch.tensor([[[[1.0] * 8, [3.0] * 8]]]))


@pytest.mark.parametrize("indices,updates,match", [
    (torch.tensor([[0, 4]]), torch.ones(1, 6), r"row 0 = \[0, 4\] is out of range"),
    (torch.tensor([[-1, 0]]), torch.ones(1, 6), "reserved scratch slot"),
    (torch.tensor([[0.0, 1.0]]), torch.ones(1, 6), "indices has dtype"),
    (torch.tensor([0, 1]), torch.ones(6), "at least 2-D"),
    (torch.tensor([[0, 1, 2, 0]]), torch.ones(1), "last dim is 4"),
    (torch.tensor([[0, 1]]), torch.ones(1, 5), r"pass indices.shape\[:-1\] \+ self.shape\[2:\]"),
    (torch.tensor([[0, 1]]), torch.ones(1, 6, dtype=torch.float16), "updates has dtype"),
])
@pytest.mark.parametrize("fn", [nd, graph_op])
def test_scatter_nd_checks(indices, updates, match, fn):
    with pytest.raises(ValueError, match=match):
        fn(torch.zeros(3, 4, 6), indices, updates)


@pytest.mark.parametrize("indices,updates,axis,match,exc", [
    (torch.tensor([3]), torch.ones(1, 2, 2, 4), -2, r"runs outside \[0, 4\)", ValueError),
    (torch.tensor([-1]), torch.ones(1, 2, 1, 4), -2, "runs outside", ValueError),
    (torch.tensor([0, 0]), torch.ones(1, 2, 1, 4), -2, "has 2 entries", ValueError),
    (torch.tensor([0]), torch.ones(1, 3, 1, 4), -2, "updates must equal self", ValueError),
    (torch.tensor([0]), torch.ones(1, 2, 1, 4), 0, "batch dim", ValueError),
    (torch.tensor([0]), torch.ones(1, 2, 1, 4), 4, "axis is 4", ValueError),
    (torch.tensor([[0, 1]]), torch.ones(1, 2, 1, 4), -2, "2-D tensor", NotImplementedError),
    (torch.tensor([0]), torch.ones(2, 1, 4), -2, "share rank", ValueError),
])
def test_scatter_update_checks(indices, updates, axis, match, exc):
    with pytest.raises(exc, match=match):
        axis_op(torch.zeros(1, 2, 4, 4), indices, updates, axis)


# ------------------------------------------------------------------------------- compile pipeline

class WriteKV(torch.nn.Module):
    """A paged-prefill-like step: write T tokens' K into the pool, then read the pool."""

    def forward(self, cache, block_offset, k_new):
        torch.ops.graphgen.kv_cache_scatter_(cache, block_offset, k_new)
        return cache.sum(dim=(1, 2)) + k_new.sum()


class WriteKVAlias(torch.nn.Module):
    def forward(self, cache, block_offset, k_new):
        torch.ops.graphgen.npu_scatter_nd_update_(cache, block_offset, k_new)
        return cache.sum(dim=(1, 2))


def _inputs(tokens, seed=0):
    gen = torch.Generator().manual_seed(seed)
    slots = torch.randperm(4 * 8, generator=gen)[:tokens]
    return torch.zeros(4, 8, 16), torch.stack([slots // 8, slots % 8], -1), torch.randn(tokens, 16, generator=gen)


def _export():
    t = torch.export.Dim("tokens", min=1, max=32)
    return torch.export.export(WriteKV(), _inputs(3), dynamic_shapes=(None, {0: t}, {0: t}), strict=False)


def test_graph_op_export_dynamic_tokens_and_compile_fullgraph():
    ep = _export()
    decomposed = ep.run_decompositions({})
    assert "auto_functionalized" in decomposed.graph_module.code
    assert any(spec.kind.name == "USER_INPUT_MUTATION" for spec in decomposed.graph_signature.output_specs)
    for fn in (ep.module(), torch.compile(WriteKV(), fullgraph=True, dynamic=True)):
        for tokens in (5, 9):
            cache, idx, upd = _inputs(tokens, seed=tokens)
            want_cache, want_out = cache.clone(), None
            want_out = WriteKV()(want_cache, idx, upd)
            out = fn(cache, idx, upd)
            assert torch.equal(cache, want_cache)  # the write landed in the caller's tensor
            torch.testing.assert_close(out, want_out)


@pytest.mark.slow
def test_graph_op_aoti_package_writes_callers_cache(tmp_path):
    path = torch._inductor.aoti_compile_and_package(_export(), package_path=str(tmp_path / "kv.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    for tokens in (2, 7):
        cache, idx, upd = _inputs(tokens, seed=tokens)
        want_cache = cache.clone()
        want_out = WriteKV()(want_cache, idx, upd)
        out = runner(cache, idx, upd)
        assert torch.equal(cache, want_cache)  # in place, in the caller's tensor
        torch.testing.assert_close(out, want_out)


def test_alias_returning_form_is_refused_by_torch_compile():
    """Why kv_cache_scatter_ exists: torch 2.13 cannot functionalize a custom op returning an alias."""
    cache, idx, upd = _inputs(3)
    ep = torch.export.export(WriteKVAlias(), (cache, idx, upd), strict=False)  # training IR records it
    assert "npu_scatter_nd_update_" in ep.graph_module.code
    with pytest.raises(Exception, match="alias annotations"):
        torch.compile(WriteKVAlias(), fullgraph=True, backend="aot_eager")(cache, idx, upd)
