"""graphgen::varlen_attention / graphgen::paged_attention (the portable path for softcap and sinks)
vs the canonical graphgen::attention run per sequence on contiguous K/V; checks; fake kernels
under export with dynamic sizes."""
from __future__ import annotations

import pytest
import torch

import graphgen.ops  # noqa: F401
from graphgen.passes.paged_attention import write_kv

attention = torch.ops.graphgen.attention
varlen = torch.ops.graphgen.varlen_attention
paged = torch.ops.graphgen.paged_attention

VARIANTS = [  # (sliding_window, softcap, sinks)
    (0, 0.0, False), (3, 0.0, False), (0, 2.0, False), (0, 0.0, True), (3, 1.5, True),
]


def _canonical(q, k, v, *, window, softcap, sinks, scale):
    """q (1, N, Sq, D), k/v (1, Nkv, Skv, D): bottom-right causal, like the model's own layer."""
    return attention(q, k, v, layer_idx=0, scale=scale, sliding_window=window, softcap=softcap, sinks=sinks)


@pytest.mark.parametrize("window,softcap,use_sinks", VARIANTS)
def test_varlen_matches_canonical_per_sequence(window, softcap, use_sinks):
    n, nkv, d, lens = 4, 2, 8, [5, 1, 7]
    t = sum(lens)
    q, k, v = torch.randn(t, n, d), torch.randn(t, nkv, d), torch.randn(t, nkv, d)
    sinks = torch.randn(n) if use_sinks else None
    ends = torch.tensor(lens).cumsum(0)
    out = varlen(q, k, v, ends, scale=0.3, sliding_window=window, softcap=softcap, sinks=sinks)
    start = 0
    for length in lens:
        sl = slice(start, start + length)
        bnsd = lambda x: x[sl].transpose(0, 1)[None]  # noqa: E731
        want = _canonical(bnsd(q), bnsd(k), bnsd(v), window=window, softcap=softcap, sinks=sinks, scale=0.3)
        torch.testing.assert_close(out[sl], want[0], rtol=1e-5, atol=1e-5)
        start += length


@pytest.mark.parametrize("layout", ["BSH", "BNSD"])
@pytest.mark.parametrize("window,softcap,use_sinks", VARIANTS)
def test_paged_matches_canonical(layout, window, softcap, use_sinks):
    n, nkv, d, bs, m = 8, 2, 16, 4, 4  # GQA 4
    kv_lens, sq = [9, 3], 2  # extend-like: the last 2 positions of each sequence query
    pools_shape = (1 + 2 * m, bs, nkv * d) if layout == "BSH" else (1 + 2 * m, nkv, bs, d)
    key_cache, value_cache = torch.zeros(pools_shape), torch.zeros(pools_shape)
    table = torch.tensor([[5, 2, 7, 1], [3, 8, 0, 0]], dtype=torch.int32)  # scattered blocks, scratch padding
    sinks = torch.randn(n) if use_sinks else None
    q = torch.randn(2, n, sq, d)
    keys, values = [], []
    for b, length in enumerate(kv_lens):
        k, v = torch.randn(length, nkv, d), torch.randn(length, nkv, d)
        slots = torch.tensor([int(table[b, p // bs]) * bs + p % bs for p in range(length)])
        write_kv(key_cache, slots, k, layout=layout, block_size=bs)
        write_kv(value_cache, slots, v, layout=layout, block_size=bs)
        keys.append(k)
        values.append(v)
    out = paged(q, key_cache, value_cache, table, torch.tensor(kv_lens), num_key_value_heads=nkv, scale=0.25,
                sliding_window=window, softcap=softcap, sinks=sinks)
    assert out.shape == (2, sq, n, d)
    for b in range(2):
        want = _canonical(q[b:b + 1], keys[b].transpose(0, 1)[None], values[b].transpose(0, 1)[None],
                          window=window, softcap=softcap, sinks=sinks, scale=0.25)
        torch.testing.assert_close(out[b], want[0], rtol=1e-5, atol=1e-5)


def test_sinks_and_softcap_change_the_result():
    """Guards the tests above: the options are not silently ignored."""
    q, k, v = torch.randn(6, 2, 8) * 3, torch.randn(6, 2, 8) * 3, torch.randn(6, 2, 8)
    ends = torch.tensor([6])
    plain = varlen(q, k, v, ends, scale=1.0)
    assert not torch.allclose(plain, varlen(q, k, v, ends, scale=1.0, softcap=0.5), atol=1e-3)
    assert not torch.allclose(plain, varlen(q, k, v, ends, scale=1.0, sinks=torch.full((2,), 2.0)), atol=1e-3)


def test_checks_name_the_argument():
    q, k = torch.randn(4, 3, 8), torch.randn(4, 2, 8)
    with pytest.raises(ValueError, match="varlen_attention: query has 3 heads"):
        varlen(q, k, k, torch.tensor([4]), scale=1.0)
    with pytest.raises(ValueError, match=r"sinks has shape \(2,\)"):
        varlen(torch.randn(4, 4, 8), k, k, torch.tensor([4]), scale=1.0, sinks=torch.zeros(2))
    with pytest.raises(ValueError, match="paged_attention: query has 3 dims"):
        paged(q, torch.zeros(2, 4, 16), torch.zeros(2, 4, 16), torch.zeros(1, 1, dtype=torch.int32),
              torch.tensor([1]), num_key_value_heads=2, scale=1.0)


def test_fake_kernels_export_with_dynamic_sizes():
    class M(torch.nn.Module):
        def forward(self, q, k, v, ends, qd, kc, vc, table, lens):
            a = varlen(q, k, v, ends, scale=0.5, softcap=1.0)
            b = paged(qd, kc, vc, table, lens, num_key_value_heads=2, scale=0.5, sliding_window=2)
            return a, b

    args = (torch.randn(5, 4, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8), torch.tensor([2, 5]),
            torch.randn(3, 4, 1, 8), torch.randn(6, 4, 16), torch.randn(6, 4, 16),
            torch.randint(0, 6, (3, 2), dtype=torch.int32), torch.tensor([3, 5, 8]))
    t, b = torch.export.Dim("t", min=2, max=64), torch.export.Dim("b", min=2, max=16)
    dims = ({0: t}, {0: t}, {0: t}, None, {0: b}, None, None, {0: b}, {0: b})
    ep = torch.export.export(M(), args, dynamic_shapes=dims, strict=False)
    got = ep.module()(*args)
    want = M()(*args)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
