"""npu_fused_infer_attention_score against the naive reference: IFA-like (Q_S = 1) and PFA-like
calls, paged KV (chunked prefill), softmax_lse, shared prefix, query padding, rope, per-token
antiquant and the key_/value_ forms, inner_precise, and the schema's exact argument names."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import graphgen.ops  # noqa: F401
from tests.naive import inference_allowed, naive_attention, pack_tnd, page_kv, to_layout, zero_rows

fia = torch.ops.graphgen.npu_fused_infer_attention_score
UNB = [2147483647, 2147473647]


def paged_pair(k, v, bs, bnsd_cache, seed):
    key, table = page_kv(k, bs, bnsd_cache, torch.Generator().manual_seed(seed))
    value = torch.zeros_like(key)
    for bi in range(k.shape[0]):
        for pos in range(k.shape[2]):
            blk, t = int(table[bi, pos // bs]), pos % bs
            if bnsd_cache:
                value[blk, :, t] = v[bi, :, pos]
            else:
                value[blk, t] = v[bi, :, pos].reshape(-1)
    return key, value, table


@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_fia_matches_naive(data):
    layout = data.draw(st.sampled_from(["BSH", "BNSD", "BSND", "TND"]))
    nkv = data.draw(st.sampled_from([1, 2]))
    n = nkv * data.draw(st.sampled_from([1, 2, 4, 8]))
    b, d = data.draw(st.integers(1, 3)), data.draw(st.sampled_from([16, 32]))
    sq = data.draw(st.sampled_from([1, 1, 2, 5]))
    skv = data.draw(st.integers(sq, 40))
    paged = data.draw(st.booleans())
    mode = data.draw(st.sampled_from([0, 2, 3, 4]))
    pre, nxt = data.draw(st.sampled_from(UNB + [0, 3])), data.draw(st.sampled_from(UNB + [0, 2]))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float32, torch.float16, torch.bfloat16]))
    use_lens = paged or layout == "TND" or data.draw(st.booleans())
    q_lens = [data.draw(st.integers(1, sq)) for _ in range(b)] if use_lens else [sq] * b
    kv_lens = [data.draw(st.integers(1, skv)) for _ in range(b)] if use_lens else [skv] * b
    lse_flag = data.draw(st.booleans())
    scale = 1 / math.sqrt(d)
    q = torch.randn(b, n, sq, d).to(dtype)
    k, v = torch.randn(b, nkv, skv, d).to(dtype), torch.randn(b, nkv, skv, d).to(dtype)
    kw = dict(num_heads=n, scale=scale, input_layout=layout, num_key_value_heads=nkv, sparse_mode=mode,
              pre_tokens=pre, next_tokens=nxt, softmax_lse_flag=lse_flag)
    mask_fn = None
    if mode == 0 and data.draw(st.booleans()):
        full = torch.rand(b, 1, sq, skv) < 0.3
        kw["atten_mask"] = full if layout != "TND" else full[0, 0]
        mask_fn = lambda bi, h, i, j: bool(full[bi if layout != "TND" else 0, 0, i, j])  # noqa: E731
    elif mode in (2, 3, 4):
        kw["atten_mask"] = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), 1)
    if paged:
        bs = data.draw(st.sampled_from([16, 32]))
        key, value, table = paged_pair(k, v, bs, layout == "BNSD", data.draw(st.integers(0, 99)))
        kw.update(block_table=table, block_size=bs)
    if layout == "TND":
        kw["actual_seq_lengths"] = [sum(q_lens[: i + 1]) for i in range(b)]
        kw["actual_seq_lengths_kv"] = kv_lens if paged else [sum(kv_lens[: i + 1]) for i in range(b)]
        query = pack_tnd(q, q_lens)
        if not paged:
            key, value = pack_tnd(k, kv_lens), pack_tnd(v, kv_lens)
    else:
        if use_lens:
            kw["actual_seq_lengths"], kw["actual_seq_lengths_kv"] = q_lens, kv_lens
        query = to_layout(q, layout)
        if not paged:
            key, value = to_layout(k, layout), to_layout(v, layout)

    allowed = inference_allowed(q_lens, kv_lens, sparse_mode=mode, pre_tokens=pre, next_tokens=nxt, mask=mask_fn)
    want, want_lse = naive_attention(q, k, v, scale=scale, allowed=allowed)
    want = zero_rows(want, q_lens)
    out, lse = fia(query, key, value, **kw)
    tol = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 6e-2}[dtype]
    want = pack_tnd(want, q_lens) if layout == "TND" else to_layout(want, layout)
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    if lse_flag:
        want_lse = zero_rows(want_lse.unsqueeze(-1), q_lens)
        want_lse = pack_tnd(want_lse, q_lens) if layout == "TND" else want_lse
        torch.testing.assert_close(lse.double(), want_lse, atol=max(tol, 1e-5), rtol=max(tol, 1e-5))
    else:
        assert lse.shape == (1,) and lse.item() == 0
    tkw = dict(kw)
    for name in ("actual_seq_lengths", "actual_seq_lengths_kv"):
        if name in tkw:
            tkw[name] = torch.tensor(tkw[name], dtype=torch.int32)
    out_t, _ = torch.ops.graphgen.npu_fused_infer_attention_score.tensor_lengths(query, key, value, **tkw)
    assert torch.equal(out_t, out)


def test_fia_shared_prefix_is_prepended():
    b, n, s, d, sp, p = 2, 2, 6, 16, 5, 3
    q, k, v = torch.randn(b, n, 1, d), torch.randn(b, n, s, d), torch.randn(b, n, s, d)
    kp, vp = torch.randn(1, n, sp, d), torch.randn(1, n, sp, d)
    lens = [4, 6]
    out, _ = fia(q, k, v, num_heads=n, scale=0.3, input_layout="BNSD", actual_seq_lengths_kv=lens,
                 key_shared_prefix=kp, value_shared_prefix=vp, actual_shared_prefix_len=[p])
    for bi, ln in enumerate(lens):
        kc = torch.cat([kp[:, :, :p], k[bi:bi + 1, :, :ln]], dim=2)
        vc = torch.cat([vp[:, :, :p], v[bi:bi + 1, :, :ln]], dim=2)
        want, _ = naive_attention(q[bi:bi + 1], kc, vc, scale=0.3)
        torch.testing.assert_close(out[bi:bi + 1].double(), want, atol=1e-5, rtol=1e-5)


def test_fia_query_padding_is_left_padding():
    b, n, sq, skv, d, pad = 2, 2, 6, 8, 16, 1
    q, k, v = torch.randn(b, sq, n, d), torch.randn(b, skv, n, d), torch.randn(b, skv, n, d)
    q_lens, kv_lens = [3, 5], [5, 8]
    out, _ = fia(q, k, v, num_heads=n, scale=0.3, input_layout="BSND", actual_seq_lengths=q_lens,
                 actual_seq_lengths_kv=kv_lens, query_padding_size=torch.tensor([pad]),
                 kv_padding_size=torch.tensor([0]), sparse_mode=3,
                 atten_mask=torch.triu(torch.ones(2048, 2048, dtype=torch.bool), 1))
    for bi in range(b):
        q0 = sq - pad - q_lens[bi]
        qs = q[bi:bi + 1, q0: q0 + q_lens[bi]].transpose(1, 2)
        ks, vs = (t[bi:bi + 1, skv - kv_lens[bi]:].transpose(1, 2) for t in (k, v))
        allowed = inference_allowed([q_lens[bi]], [kv_lens[bi]], sparse_mode=3)
        want, _ = naive_attention(qs, ks, vs, scale=0.3, allowed=allowed)
        torch.testing.assert_close(out[bi:bi + 1, q0: q0 + q_lens[bi]].double(), want.transpose(1, 2),
                                   atol=1e-5, rtol=1e-5)
        assert torch.all(out[bi, :q0] == 0) and torch.all(out[bi, q0 + q_lens[bi]:] == 0)


def test_fia_rope_adds_to_the_dot_product():
    b, n, s, d, dr = 1, 2, 4, 32, 16
    q, k, v = torch.randn(b, n, s, d), torch.randn(b, n, s, d), torch.randn(b, n, s, d)
    qr, kr = torch.randn(b, n, s, dr), torch.randn(b, n, s, dr)
    out, _ = fia(q, k, v, query_rope=qr, key_rope=kr, num_heads=n, scale=0.1, input_layout="BNSD")
    want, _ = naive_attention(torch.cat([q, qr], -1), torch.cat([k, kr], -1), v, scale=0.1)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("separate", [False, True])
def test_fia_per_token_antiquant(separate):
    b, n, s, d = 2, 2, 7, 32
    q = torch.randn(b, n, 1, d, dtype=torch.float16)
    k8, v8 = (torch.randint(-128, 128, (b, n, s, d), dtype=torch.int8) for _ in range(2))
    scale, offset = torch.rand(2, b, s) * 0.02, torch.randn(2, b, s).round()
    kw = dict(num_heads=n, scale=0.2, input_layout="BNSD")
    if separate:
        kw.update(key_antiquant_scale=scale[0], key_antiquant_offset=offset[0], key_antiquant_mode=1,
                  value_antiquant_scale=scale[1], value_antiquant_offset=offset[1], value_antiquant_mode=1,
                  antiquant_scale=torch.tensor([100.0, 100.0]))  # the separate forms win
    else:
        kw.update(antiquant_scale=scale, antiquant_offset=offset, antiquant_mode=1)
    out, _ = fia(q, k8, v8, **kw)
    kd = (k8.double() + offset[0].view(b, 1, s, 1)) * scale[0].view(b, 1, s, 1)
    vd = (v8.double() + offset[1].view(b, 1, s, 1)) * scale[1].view(b, 1, s, 1)
    want, _ = naive_attention(q, kd, vd, scale=0.2)
    torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("inner_precise", [2, 3])
def test_fia_fully_masked_rows_are_zero(inner_precise):
    q, k, v = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[1] = True  # row 1 sees nothing
    out, lse = fia(q, k, v, num_heads=2, input_layout="BNSD", atten_mask=mask, inner_precise=inner_precise,
                   softmax_lse_flag=True)
    assert torch.all(out[:, :, 1] == 0) and torch.isfinite(out).all()
    assert torch.all(lse[:, :, 1] == -math.inf) and torch.isfinite(lse[:, :, 0]).all()


def test_fia_lse_shapes():
    q, k = torch.randn(2, 3, 4 * 16), torch.randn(2, 5, 2 * 16)
    _, lse = fia(q, k, k, num_heads=4, num_key_value_heads=2, softmax_lse_flag=True)
    assert lse.shape == (2, 4, 3, 1) and lse.dtype == torch.float32
    qt, kt = torch.randn(7, 4, 16), torch.randn(9, 4, 16)
    _, lse = fia(qt, kt, kt, num_heads=4, input_layout="TND", actual_seq_lengths=[3, 7],
                 actual_seq_lengths_kv=[4, 9], softmax_lse_flag=True)
    assert lse.shape == (7, 4, 1)


def test_fia_seed_example_with_cache_longer_than_query():
    q, kc = torch.randn(1, 8, 1, 64, dtype=torch.float16), torch.randn(1, 8, 100, 64, dtype=torch.float16)
    out, lse = fia(q, kc, kc, num_heads=8, scale=1 / 8, input_layout="BNSD", actual_seq_lengths=[1],
                   actual_seq_lengths_kv=[100], sparse_mode=3, pre_tokens=65535, next_tokens=0,
                   atten_mask=torch.triu(torch.ones(2048, 2048, dtype=torch.bool), 1), softmax_lse_flag=True)
    assert out.shape == (1, 8, 1, 64) and lse.shape == (1, 8, 1, 1)
    with pytest.raises(Exception, match="scale_value"):  # the seed passes IFA's name; FIA calls it `scale`
        fia(q, kc, kc, num_heads=8, scale_value=1 / 8, input_layout="BNSD")
