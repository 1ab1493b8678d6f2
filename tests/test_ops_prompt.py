"""npu_prompt_flash_attention against the naive reference (masks from npu-ops.md, element by
element), SDPA where they overlap, and the int8 paths against their explicit formulas."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import graphgen.ops  # noqa: F401
from tests.naive import inference_allowed, naive_attention, pack_tnd, to_layout, zero_rows

pfa = torch.ops.graphgen.npu_prompt_flash_attention
UNB = [2147483647, 2147473647]
TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def compressed_mask(shape):
    return torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1).reshape(shape)


@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_pfa_matches_naive(data):
    layout = data.draw(st.sampled_from(["BSH", "BNSD", "BSND", "TND"]))
    nkv = data.draw(st.sampled_from([1, 2]))
    n = nkv * data.draw(st.sampled_from([1, 2, 4, 8]))
    b, sq, skv = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 6)), data.draw(st.integers(1, 7))
    d = data.draw(st.sampled_from([16, 32]))
    mode = data.draw(st.sampled_from([0, 1, 2, 3, 4]))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float32, torch.float16, torch.bfloat16]))
    pre = data.draw(st.sampled_from(UNB + [0, 1, 2, 4]))
    nxt = data.draw(st.sampled_from(UNB + [0, 1, 3]))
    use_lens = layout == "TND" or data.draw(st.booleans())
    lo = 1 if layout == "TND" else 0
    q_lens = [data.draw(st.integers(lo, sq)) for _ in range(b)] if use_lens else [sq] * b
    kv_lens = [data.draw(st.integers(lo, skv)) for _ in range(b)] if use_lens else [skv] * b
    scale = 1 / math.sqrt(d)
    q = torch.randn(b, n, sq, d).to(dtype)
    k = torch.randn(b, nkv, skv, d).to(dtype)
    v = torch.randn(b, nkv, skv, d).to(dtype)

    kw = dict(num_heads=n, scale_value=scale, input_layout=layout, sparse_mode=mode, pre_tokens=pre,
              next_tokens=nxt, num_key_value_heads=nkv if data.draw(st.booleans()) or nkv != n else 0)
    mask_fn = None
    if mode in (0, 1) and (mode == 1 or data.draw(st.booleans())):
        per_batch = layout != "TND" and data.draw(st.booleans())
        full = torch.rand(b if per_batch else 1, 1, sq, skv) < 0.3
        as_dtype = data.draw(st.sampled_from([torch.bool, torch.uint8, torch.int8, torch.float16]))
        kw["atten_mask"] = (full if per_batch else full[0, 0]).to(as_dtype)
        mask_fn = (lambda bi, h, i, j: bool(full[bi if per_batch else 0, 0, i, j]))
    elif mode in (2, 3, 4) and data.draw(st.booleans()):
        kw["atten_mask"] = compressed_mask(data.draw(st.sampled_from([(2048, 2048), (1, 2048, 2048), (1, 1, 2048, 2048)])))
    if use_lens:
        if layout == "TND":
            kw["actual_seq_lengths"] = [sum(q_lens[: i + 1]) for i in range(b)]
            kw["actual_seq_lengths_kv"] = [sum(kv_lens[: i + 1]) for i in range(b)]
        else:
            kw["actual_seq_lengths"], kw["actual_seq_lengths_kv"] = q_lens, kv_lens

    allowed = inference_allowed(q_lens, kv_lens, sparse_mode=mode, pre_tokens=pre, next_tokens=nxt, mask=mask_fn)
    want, _ = naive_attention(q, k, v, scale=scale, allowed=allowed)
    want = zero_rows(want, q_lens)
    if layout == "TND":
        got = pfa(pack_tnd(q, q_lens), pack_tnd(k, kv_lens), pack_tnd(v, kv_lens), **kw)
        want = pack_tnd(want, q_lens)
    else:
        got = pfa(to_layout(q, layout), to_layout(k, layout), to_layout(v, layout), **kw)
        want = to_layout(want, layout)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, atol=TOL[dtype], rtol=TOL[dtype])

    # the tensor_lengths overload is the same op
    if use_lens:
        tkw = dict(kw, actual_seq_lengths=torch.tensor(kw["actual_seq_lengths"], dtype=torch.int32),
                   actual_seq_lengths_kv=torch.tensor(kw["actual_seq_lengths_kv"]))
        args = (pack_tnd(q, q_lens), pack_tnd(k, kv_lens), pack_tnd(v, kv_lens)) if layout == "TND" else \
            (to_layout(q, layout), to_layout(k, layout), to_layout(v, layout))
        assert torch.equal(torch.ops.graphgen.npu_prompt_flash_attention.tensor_lengths(*args, **tkw), got)


@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("mode", [2, 3])
def test_pfa_causal_matches_sdpa(group, mode):
    b, nkv, s, d = 2, 2, 9, 32
    n = nkv * group
    q, k, v = torch.randn(b, n, s, d), torch.randn(b, nkv, s, d), torch.randn(b, nkv, s, d)
    got = pfa(q, k, v, num_heads=n, num_key_value_heads=nkv, scale_value=0.2, input_layout="BNSD", sparse_mode=mode)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                          is_causal=True, scale=0.2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_pfa_no_mask_is_full_attention_and_prefill_is_bottom_right():
    q, k, v = torch.randn(1, 4, 3, 16), torch.randn(1, 4, 7, 16), torch.randn(1, 4, 7, 16)
    got = pfa(q, k, v, num_heads=4, input_layout="BNSD", scale_value=0.25)  # mode 0, no mask: pre/next ignored
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, scale=0.25), atol=1e-5, rtol=1e-5)
    got = pfa(q, k, v, num_heads=4, input_layout="BNSD", scale_value=0.25, sparse_mode=3)
    bottom_right = torch.ones(3, 7, dtype=torch.bool).tril(diagonal=4)  # the last 3 of 7 positions
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=bottom_right, scale=0.25),
                               atol=1e-5, rtol=1e-5)


def test_pfa_pse_shift_is_added_to_scaled_logits():
    q, k, v = torch.randn(2, 2, 4, 16), torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    pse = torch.randn(1, 2, 4, 5)
    got = pfa(q, k, v, num_heads=2, input_layout="BNSD", scale_value=0.3, pse_shift=pse)
    want, _ = naive_attention(q, k, v, scale=0.3, bias=pse)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_pfa_seed_example_runs():
    query = torch.randn(1, 64, 8, 128, dtype=torch.float16)
    key = torch.randn(1, 64, 8, 128, dtype=torch.float16)
    value = torch.randn(1, 64, 8, 128, dtype=torch.float16)
    with pytest.warns(UserWarning, match="num_heads=8"):
        out = pfa(query, key, value, num_heads=8, scale_value=1 / math.sqrt(128), input_layout="BNSD",
                  sparse_mode=3, pre_tokens=65535, next_tokens=0)
    assert out.shape == (1, 64, 8, 128) and out.dtype == torch.float16 and torch.isfinite(out).all()


def _int8(shape):
    return torch.randint(-100, 100, shape, dtype=torch.int8)


def test_pfa_full_int8_path_formula():
    b, n, s, d = 2, 2, 5, 32
    q, k, v = _int8((b, n, s, d)), _int8((b, n, s, d)), _int8((b, n, s, d))
    deq1, qs1, deq2 = torch.tensor([0.0007]), torch.tensor([100.0]), torch.tensor([0.0003])
    qs2, qo2 = torch.tensor([40.0]), torch.tensor([2.0])
    scale = 1 / math.sqrt(d)
    logits = (q.double() @ k.double().transpose(-1, -2)) * 0.0007 * scale
    logits = logits.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), -math.inf)
    p_q = torch.round(torch.softmax(logits, -1) * 100.0).clamp(-128, 127)
    want = (p_q @ v.double()) * 0.0003
    base = dict(num_heads=n, scale_value=scale, input_layout="BNSD", sparse_mode=2)
    got = pfa(q, k, v, deq_scale1=deq1, quant_scale1=qs1, deq_scale2=deq2, **base)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.double(), want, atol=2e-3, rtol=2e-3)
    got8 = pfa(q, k, v, deq_scale1=deq1, quant_scale1=qs1, deq_scale2=deq2, quant_scale2=qs2, quant_offset2=qo2, **base)
    want8 = torch.round(want * 40.0 + 2.0).clamp(-128, 127)
    assert got8.dtype == torch.int8
    assert (got8.double() - want8).abs().max() <= 1 and (got8.double() == want8).float().mean() > 0.95
    # uint64 quant parameters (npu_trans_quant_param form: fp32 bits in the low 32 bits)
    packed = lambda t: t.view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # noqa: E731
    got_packed = pfa(q, k, v, deq_scale1=packed(deq1), quant_scale1=qs1, deq_scale2=packed(deq2), **base)
    assert torch.equal(got_packed, got)


@pytest.mark.parametrize("layout", ["BSH", "BNSD", "BSND"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_pfa_output_quant_formula(layout, per_channel):
    b, n, s, d = 2, 2, 4, 16
    q, k, v = torch.randn(b, n, s, d), torch.randn(b, n, s, d), torch.randn(b, n, s, d)
    if per_channel:
        scale2, offset2 = torch.rand(n, d) * 50 + 10, torch.randn(n, d).round()
        shape = {"BSH": (n * d,), "BNSD": (1, n, 1, d), "BSND": (1, 1, n, d)}[layout]
        qs2, qo2 = scale2.reshape(shape), offset2.reshape(shape)
        sc, of = scale2.view(1, n, 1, d), offset2.view(1, n, 1, d)
    else:
        qs2, qo2 = torch.tensor([37.5]), torch.tensor([-3.0])
        sc, of = 37.5, -3.0
    got = pfa(to_layout(q, layout), to_layout(k, layout), to_layout(v, layout), num_heads=n, scale_value=0.25,
              input_layout=layout, quant_scale2=qs2, quant_offset2=qo2, sparse_mode=3)
    ref, _ = naive_attention(q, k, v, scale=0.25, allowed=inference_allowed([s] * b, [s] * b, sparse_mode=3))
    want = to_layout(torch.round(ref * sc + of).clamp(-128, 127), layout)
    assert got.dtype == torch.int8
    assert (got.double() - want).abs().max() <= 1 and (got.double() == want).float().mean() > 0.95


def test_round_half_to_even_and_saturate():
    from graphgen.ops._layouts import quantize_int8
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 300.0, -300.0])
    assert quantize_int8(x, torch.tensor(1.0), None).tolist() == [0, 2, 2, 0, -2, 127, -128]
