"""npu_incre_flash_attention against the naive reference: layouts, GQA, lengths, masks, pse,
paged KV (both cache layouts, block sizes 16/32), left padding, int8 antiquant and output quant."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import graphgen.ops  # noqa: F401
from tests.naive import inference_allowed, naive_attention, page_kv, to_layout, zero_rows

ifa = torch.ops.graphgen.npu_incre_flash_attention
TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 6e-2}


@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_ifa_matches_naive(data):
    layout = data.draw(st.sampled_from(["BSH", "BNSD", "BSND"]))
    nkv = data.draw(st.sampled_from([1, 2]))
    n = nkv * data.draw(st.sampled_from([1, 2, 4, 8]))
    b, skv, d = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 40)), data.draw(st.sampled_from([16, 32]))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float32, torch.float16, torch.bfloat16]))
    paged = data.draw(st.booleans())
    use_lens = paged or data.draw(st.booleans())
    kv_lens = [data.draw(st.integers(0, skv)) for _ in range(b)] if use_lens else [skv] * b
    scale = 1 / math.sqrt(d)
    q = torch.randn(b, n, 1, d).to(dtype)
    k, v = torch.randn(b, nkv, skv, d).to(dtype), torch.randn(b, nkv, skv, d).to(dtype)
    kw = dict(num_heads=n, scale_value=scale, input_layout=layout, num_key_value_heads=nkv)
    if use_lens:
        kw["actual_seq_lengths"] = kv_lens
    mask_fn, bias = None, None
    if data.draw(st.booleans()):
        full = torch.rand(b, skv) < 0.3
        shape = data.draw(st.sampled_from([(b, skv), (b, 1, skv), (b, 1, 1, skv)]))
        kw["atten_mask"] = full.reshape(shape).to(data.draw(st.sampled_from([torch.bool, torch.int8, torch.uint8])))
        mask_fn = lambda bi, h, i, j: bool(full[bi, j])  # noqa: E731
    if data.draw(st.booleans()):
        bias = torch.randn(data.draw(st.sampled_from([1, b])), n, 1, skv).to(dtype)
        kw["pse_shift"] = bias
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 100)))
    if paged:
        bs = data.draw(st.sampled_from([16, 32]))
        bnsd_cache = layout == "BNSD"
        key, table = page_kv(k, bs, bnsd_cache, gen)
        value, _ = page_kv(v, bs, bnsd_cache, gen)
        # page_kv drew its own blocks for value: re-copy value into the key's blocks
        value = torch.zeros_like(key)
        for bi in range(b):
            for pos in range(skv):
                blk, t = int(table[bi, pos // bs]), pos % bs
                if bnsd_cache:
                    value[blk, :, t] = v[bi, :, pos]
                else:
                    value[blk, t] = v[bi, :, pos].reshape(-1)
        kw.update(block_table=table, block_size=bs)
    else:
        key, value = to_layout(k, layout), to_layout(v, layout)
    allowed = inference_allowed([1] * b, kv_lens, mask=mask_fn, band_with_mask=False)
    want, _ = naive_attention(q, k, v, scale=scale, allowed=allowed, bias=bias)
    got = ifa(to_layout(q, layout), key, value, **kw)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), to_layout(want, layout), atol=TOL[dtype], rtol=TOL[dtype])
    if use_lens:
        tkw = dict(kw, actual_seq_lengths=torch.tensor(kv_lens, dtype=torch.int32))
        got_t = torch.ops.graphgen.npu_incre_flash_attention.tensor_lengths(to_layout(q, layout), key, value, **tkw)
        assert torch.equal(got_t, got)


def test_ifa_kv_padding_is_left_padding():
    b, n, s, d, pad = 2, 2, 10, 16, 3
    lens = [4, 7]
    q, k, v = torch.randn(b, n, 1, d), torch.randn(b, n, s, d), torch.randn(b, n, s, d)
    got = ifa(q, k, v, num_heads=n, input_layout="BNSD", scale_value=0.3, actual_seq_lengths=lens,
              kv_padding_size=torch.tensor([pad]))
    for bi, ln in enumerate(lens):  # valid KV of batch b is [S - pad - len, S - pad)
        ks, vs = k[bi:bi + 1, :, s - pad - ln: s - pad], v[bi:bi + 1, :, s - pad - ln: s - pad]
        want, _ = naive_attention(q[bi:bi + 1], ks, vs, scale=0.3)
        torch.testing.assert_close(got[bi:bi + 1].double(), want, atol=1e-5, rtol=1e-5)


def test_ifa_zero_length_gives_zero_row():
    q, k, v = torch.randn(2, 1, 32), torch.randn(2, 8, 32), torch.randn(2, 8, 32)
    got = ifa(q, k, v, num_heads=2, actual_seq_lengths=[0, 8])
    assert torch.all(got[0] == 0) and torch.all(got[1] != 0)


@pytest.mark.parametrize("layout", ["BSH", "BNSD", "BSND"])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("with_offset", [False, True])
def test_ifa_int8_antiquant_formula(layout, granularity, with_offset):
    b, n, nkv, s, d = 2, 4, 2, 9, 32
    q = torch.randn(b, n, 1, d, dtype=torch.float16)
    k8 = torch.randint(-128, 128, (b, nkv, s, d), dtype=torch.int8)
    v8 = torch.randint(-128, 128, (b, nkv, s, d), dtype=torch.int8)
    if granularity == "tensor":
        scale, offset = torch.tensor([0.02, 0.03]), torch.tensor([1.0, -2.0])
        ks, vs, ko, vo = 0.02, 0.03, 1.0, -2.0
    else:
        sc, of = torch.rand(2, nkv, d) * 0.05, torch.randn(2, nkv, d).round()
        shape = {"BSH": (2, nkv * d), "BNSD": (2, nkv, 1, d), "BSND": (2, nkv, d)}[layout]
        scale, offset = sc.reshape(shape), of.reshape(shape)
        ks, vs = sc[0].view(1, nkv, 1, d), sc[1].view(1, nkv, 1, d)
        ko, vo = of[0].view(1, nkv, 1, d), of[1].view(1, nkv, 1, d)
    if not with_offset:
        offset, ko, vo = None, 0.0, 0.0
    got = ifa(to_layout(q, layout), to_layout(k8, layout), to_layout(v8, layout), num_heads=n,
              num_key_value_heads=nkv, scale_value=0.2, input_layout=layout,
              antiquant_scale=scale.half(), antiquant_offset=None if offset is None else offset.half())
    kd = (k8.double() + ko) * ks
    vd = (v8.double() + vo) * vs
    want, _ = naive_attention(q, kd, vd, scale=0.2)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.double(), to_layout(want, layout), atol=2e-2, rtol=2e-2)


def test_ifa_int8_kv_paged_with_output_quant():
    b, n, s, d, bs = 2, 2, 40, 32, 32
    q = torch.randn(b, n, 1, d, dtype=torch.float16)
    k8 = torch.randint(-128, 128, (b, n, s, d), dtype=torch.int8)
    gen = torch.Generator().manual_seed(0)
    cache, table = page_kv(k8, bs, True, gen)
    scale = torch.tensor([0.01, 0.01], dtype=torch.float16)
    qs2, qo2 = torch.tensor([30.0]), torch.tensor([1.0])
    got = ifa(q, cache, cache, num_heads=n, scale_value=0.2, input_layout="BNSD", block_table=table, block_size=bs,
              actual_seq_lengths=[s, 17], antiquant_scale=scale, quant_scale2=qs2, quant_offset2=qo2)
    kd = k8.double() * 0.01
    want, _ = naive_attention(q, kd, kd, scale=0.2, allowed=inference_allowed([1, 1], [s, 17]))
    want = torch.round(want * 30.0 + 1.0).clamp(-128, 127)
    assert got.dtype == torch.int8
    assert (got.double() - want).abs().max() <= 1


def test_ifa_inner_precise_accepts_0_and_1():
    q, k, v = torch.randn(1, 1, 32), torch.randn(1, 5, 32), torch.randn(1, 5, 32)
    a = ifa(q, k, v, num_heads=2, inner_precise=0)
    torch.testing.assert_close(a, ifa(q, k, v, num_heads=2, inner_precise=1))
