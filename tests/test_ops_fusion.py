"""npu_fusion_attention (training op): forward vs the naive reference over layouts, sparse modes,
varlen, GQA, pse, sink and dtypes; gradcheck of the backward against autograd of the naive math;
dropout reproducibility from (seed, offset); fake kernel under export/compile; input checks."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import graphgen.ops  # noqa: F401
from graphgen.ops import fusion_attention as fa
from tests.naive import naive_dropout_attention, npu_sparse_allowed

op = torch.ops.graphgen.npu_fusion_attention
COMPRESSED = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)
# Mode 6: triu(2048x2048) over a (1024, 2048) block whose left half is 0 and right half 1.
PREFIX_MASK = torch.cat([COMPRESSED, torch.cat([torch.zeros(1024, 1024, dtype=torch.bool),
                                                torch.ones(1024, 1024, dtype=torch.bool)], 1)])
TOL = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2, torch.float64: 1e-10}


class _FixedDropoutState:
    """Every call gets the same (seed, offset): gradcheck's repeated evaluations see one mask."""

    def take(self):
        return 5, 11


@pytest.fixture
def fixed_dropout(monkeypatch):
    monkeypatch.setattr(fa, "_dropout_state", _FixedDropoutState())


def from_bnsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    """(B, N, S, D) -> layout, written out independently of graphgen."""
    b, n, s, d = x.shape
    if layout == "BNSD":
        return x.contiguous()
    if layout == "BSND":
        return x.permute(0, 2, 1, 3).contiguous()
    if layout == "BSH":
        return x.permute(0, 2, 1, 3).reshape(b, s, n * d)
    if layout == "SBH":
        return x.permute(2, 0, 1, 3).reshape(s, b, n * d)
    raise ValueError(layout)


def cumulative(lens):
    out, acc = [], 0
    for x in lens:
        acc += x
        out.append(acc)
    return out


def mask_for(mode: int, sq: int, skv: int, gen: torch.Generator, layout: str, b: int):
    """The atten_mask a caller passes for `mode` and the per-batch (Sq, Skv) full mask the naive
    reference applies for modes 0/1."""
    if mode in (2, 3, 4, 7, 8):
        return COMPRESSED, None
    if mode == 6:
        return PREFIX_MASK, None
    if mode == 5:
        return torch.zeros(b, 1, sq, skv, dtype=torch.bool), None  # shape only; derived from prefix
    full = torch.rand(sq, skv, generator=gen) < 0.3
    return full, full


def run_case(layout, mode, dtype, *, b, n, nkv, d, dv, seqs, pre, nxt, use_pse, use_sink, has_mask, seed):
    """Call the op and the naive reference on the same data; return (got, want, got_max, want_max)."""
    gen = torch.Generator().manual_seed(seed)
    scale = 1 / math.sqrt(d)
    varlen = layout == "TND"
    if not varlen:
        seqs = [seqs[0]] * b
    qs = [torch.randn(1, n, sq, d, generator=gen).to(dtype) for sq, _ in seqs]
    ks = [torch.randn(1, nkv, skv, d, generator=gen).to(dtype) for _, skv in seqs]
    vs = [torch.randn(1, nkv, skv, dv, generator=gen).to(dtype) for _, skv in seqs]
    max_sq, max_skv = max(s for s, _ in seqs), max(s for _, s in seqs)
    atten_mask, full = mask_for(mode, max_sq, max_skv, gen, layout, len(seqs)) if has_mask else (None, None)
    prefix = None
    if mode in (5, 6):  # upstream's range: [0, Skv] when Sq > Skv, else [Skv - Sq, Skv]
        prefix = [int(torch.randint(0 if sq > skv else skv - sq, skv + 1, (1,), generator=gen)) for sq, skv in seqs]
    pse = torch.randn(len(seqs), n, max_sq, max_skv, generator=gen).to(dtype) if use_pse else None
    sink = torch.randn(n, generator=gen) if use_sink else None

    kwargs = dict(scale=scale, pre_tockens=pre, next_tockens=nxt, sparse_mode=mode, atten_mask=atten_mask,
                  pse=pse, sink=sink, prefix=prefix)
    if varlen:
        q = torch.cat([x[0].transpose(0, 1) for x in qs])
        k = torch.cat([x[0].transpose(0, 1) for x in ks])
        v = torch.cat([x[0].transpose(0, 1) for x in vs])
        kwargs.update(actual_seq_qlen=cumulative([s for s, _ in seqs]),
                      actual_seq_kvlen=cumulative([s for _, s in seqs]))
    else:
        q, k, v = (from_bnsd(torch.cat(x), layout) for x in (qs, ks, vs))
    out, smax, ssum, sout, seed_, offset, mask_length = op(q, k, v, n, layout, **kwargs)

    wants, want_max = [], []
    for i, (sq, skv) in enumerate(seqs):
        rule = npu_sparse_allowed(
            mode, sq, skv, mask=None if not has_mask else (full[:sq, :skv] if full is not None else COMPRESSED),
            pre=pre, nxt=nxt, prefix=prefix[i] if prefix else 0,
            split_here=(mode == 7 and i == len(seqs) - 1) or (mode == 8 and i == 0))
        w, m, _ = naive_dropout_attention(qs[i], ks[i], vs[i], scale=scale, allowed=lambda b_, h, r, c: rule(r, c),
                                          pse=None if pse is None else pse[i:i + 1], sink=sink)
        wants.append(w[0])
        want_max.append(m[0])
    if varlen:
        want = torch.cat([w.transpose(0, 1) for w in wants])  # (T, N, Dv)
        wmax = torch.cat([m.transpose(0, 1) for m in want_max])  # (T, N)
        assert smax.shape == (q.shape[0], n, 8)
        assert mask_length == n * sum(a * c for a, c in seqs)
    else:
        want = from_bnsd(torch.stack(wants), layout)
        wmax = torch.stack(want_max)
        assert smax.shape == (len(seqs), n, max_sq, 8)
        assert mask_length == len(seqs) * n * max_sq * max_skv
    assert smax.dtype == ssum.dtype == torch.float32 and sout.numel() == 0
    assert (seed_, offset) == (0, 0)
    assert out.dtype == dtype and out.shape == want.shape
    assert torch.equal(smax[..., 0:1].expand_as(smax), smax)
    return out, want, smax[..., 0], wmax


@pytest.mark.filterwarnings("ignore:npu_fusion_attention. sparse_mode=.* without atten_mask")
@settings(max_examples=60, deadline=None)
@given(
    layout=st.sampled_from(["BSH", "SBH", "BSND", "BNSD", "TND"]),
    mode=st.integers(0, 8),
    dtype=st.sampled_from([torch.float32, torch.float32, torch.float16, torch.bfloat16]),
    heads=st.sampled_from([(2, 2), (4, 2), (4, 1)]),
    dims=st.sampled_from([(8, 8), (16, 8)]),
    seqs=st.lists(st.tuples(st.integers(1, 7), st.integers(1, 9)), min_size=1, max_size=3),
    b=st.integers(1, 2),
    pre=st.sampled_from([2147483647, 3, 1, 0, -1]),
    nxt=st.sampled_from([2147483647, 2, 0, -1]),
    use_pse=st.booleans(),
    use_sink=st.booleans(),
    has_mask=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_forward_matches_naive(layout, mode, dtype, heads, dims, seqs, b, pre, nxt, use_pse, use_sink, has_mask, seed):
    if layout == "TND" and mode == 5:
        mode = 6  # 5 is not a varlen mode
    if layout != "TND" and mode in (7, 8):
        mode -= 4  # 7/8 are varlen only: test 3/4 instead
    if mode in (4, 7, 8) and pre < -nxt:
        pre = -nxt  # the band must not be empty (upstream: pre/next must intersect)
    use_pse = use_pse and layout != "TND" and mode not in (7, 8)
    n, nkv = heads
    d, dv = dims
    got, want, got_max, want_max = run_case(layout, mode, dtype, b=b, n=n, nkv=nkv, d=d, dv=dv, seqs=seqs,
                                            pre=pre, nxt=nxt, use_pse=use_pse, use_sink=use_sink,
                                            has_mask=has_mask, seed=seed)
    tol = TOL[dtype]
    torch.testing.assert_close(got.double(), want.to(got.dtype).double(), atol=tol, rtol=tol)
    finite = torch.isfinite(want_max)
    assert torch.equal(torch.isfinite(got_max), finite)
    torch.testing.assert_close(got_max[finite].double(), want_max[finite], atol=tol * 10, rtol=tol * 10)


def test_sparse_mode_without_mask_is_full_attention_and_warns():
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    with pytest.warns(UserWarning, match="sparse_mode=3 without atten_mask"):
        out = op(q, k, v, 2, "BNSD", sparse_mode=3)[0]
    torch.testing.assert_close(out, op(q, k, v, 2, "BNSD")[0])


# ---------------------------------------------------------------------------------------- gradients

def _grad_case(layout, mode, keep_prob, *, use_pse, use_sink, n=4, nkv=2, seqs=((3, 4), (2, 5))):
    gen = torch.Generator().manual_seed(1)
    d = 4
    f64 = dict(dtype=torch.float64)
    if layout == "TND":
        t_q, t_kv = sum(s for s, _ in seqs), sum(s for _, s in seqs)
        q = torch.randn(t_q, n, d, generator=gen, **f64)
        k = torch.randn(t_kv, nkv, d, generator=gen, **f64)
        v = torch.randn(t_kv, nkv, d, generator=gen, **f64)
        extra = dict(actual_seq_qlen=cumulative([s for s, _ in seqs]), actual_seq_kvlen=cumulative([s for _, s in seqs]))
    else:
        sq, skv = seqs[0]
        q = torch.randn(2, n, sq, d, generator=gen, **f64)
        k = torch.randn(2, nkv, skv, d, generator=gen, **f64)
        v = torch.randn(2, nkv, skv, d, generator=gen, **f64)
        extra = {}
    mask = COMPRESSED if mode in (2, 3, 4, 7, 8) else None
    pse = torch.randn(2, n, seqs[0][0], seqs[0][1], generator=gen, **f64) if use_pse else None
    sink = torch.randn(n, generator=gen, **f64) if use_sink else None
    leaves = [t.requires_grad_(True) for t in (q, k, v, pse, sink) if t is not None]
    scale = 0.7

    def call(q, k, v, *rest):
        rest = list(rest)
        pse_ = rest.pop(0) if use_pse else None
        sink_ = rest.pop(0) if use_sink else None
        return op(q, k, v, n, layout, pse=pse_, sink=sink_, atten_mask=mask, scale=scale, keep_prob=keep_prob,
                  sparse_mode=mode, pre_tockens=2, next_tockens=0, **extra)

    return leaves, call, extra, mask, scale, n


@pytest.mark.parametrize("layout,mode,keep_prob,use_pse,use_sink", [
    ("BNSD", 0, 1.0, False, False),
    ("BNSD", 3, 1.0, True, True),
    ("BNSD", 4, 0.6, True, False),
    ("TND", 3, 0.7, False, True),
    ("TND", 7, 1.0, False, True),
])
def test_gradcheck(layout, mode, keep_prob, use_pse, use_sink, fixed_dropout):
    leaves, call, *_ = _grad_case(layout, mode, keep_prob, use_pse=use_pse, use_sink=use_sink)
    assert torch.autograd.gradcheck(lambda *a: call(*a)[0], leaves, atol=1e-6, fast_mode=layout == "TND")


@pytest.mark.parametrize("keep_prob", [1.0, 0.6])
def test_backward_matches_autograd_of_naive(keep_prob, fixed_dropout):
    """GQA + pse + sink + sparse mode 3 + dropout: gradients equal autograd of the naive math with
    the mask regenerated from the returned seed/offset."""
    leaves, call, _, _, scale, n = _grad_case("BNSD", 3, keep_prob, use_pse=True, use_sink=True)
    q, k, v, pse, sink = leaves
    out, _, _, _, seed, offset, _ = call(q, k, v, pse, sink)
    dy = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, dy)
    b, _, sq, _ = q.shape
    skv = k.shape[2]
    keep = fa.dropout_keep_mask(seed, offset, (b, n, sq, skv), keep_prob, "cpu") if keep_prob < 1 else None
    want_out, _, _ = naive_dropout_attention(q, k, v, scale=scale, allowed=lambda b_, h, i, j: j <= i + skv - sq,
                                             pse=pse, sink=sink, keep=keep, keep_prob=keep_prob)
    torch.testing.assert_close(out, want_out)
    want = torch.autograd.grad(want_out, leaves, dy)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_grad_op_shapes_without_pse_and_sink():
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    dq, dk, dv, dpse, dsink = torch.ops.graphgen.npu_fusion_attention_grad(q, k, v, torch.ones_like(q), 2, "BNSD")
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert dpse.shape == (0,) and dsink.shape == ()


# ------------------------------------------------------------------------------------------ dropout

def test_dropout_reproducible_from_seed_and_offset():
    q, k, v = torch.randn(2, 2, 16, 8), torch.randn(2, 2, 32, 8), torch.randn(2, 2, 32, 8)
    torch.manual_seed(123)
    out1, *_, seed1, off1, length = op(q, k, v, 2, "BNSD", keep_prob=0.8)
    out2, *_, seed2, off2, _ = op(q, k, v, 2, "BNSD", keep_prob=0.8)
    assert seed1 == seed2 == 123 and off1 != off2 and length == 2 * 2 * 16 * 32
    assert not torch.equal(out1, out2)  # a new offset: a new mask
    torch.manual_seed(123)  # the same default-generator state -> the same offset -> the same mask
    out3, *_, seed3, off3, _ = op(q, k, v, 2, "BNSD", keep_prob=0.8)
    assert (seed3, off3) == (seed1, off1) and torch.equal(out3, out1)
    keep = fa.dropout_keep_mask(seed1, off1, (2, 2, 16, 32), 0.8, "cpu")
    want, _, _ = naive_dropout_attention(q, k, v, scale=1.0, keep=keep, keep_prob=0.8)
    torch.testing.assert_close(out1.double(), want, atol=1e-5, rtol=1e-5)


def test_dropout_keep_rate():
    keep = fa.dropout_keep_mask(7, 0, (4, 8, 64, 64), 0.9, "cpu")
    assert abs(keep.double().mean().item() - 0.9) < 0.01
    assert torch.equal(keep, fa.dropout_keep_mask(7, 0, (4, 8, 64, 64), 0.9, "cpu"))
    assert not torch.equal(keep, fa.dropout_keep_mask(7, 1, (4, 8, 64, 64), 0.9, "cpu"))


# ------------------------------------------------------------------------------------ graph tracing

class _Training(torch.nn.Module):
    def forward(self, q, k, v):
        out, smax, ssum, _, seed, offset, length = op(q, k, v, 4, "BSH", scale=0.5, sparse_mode=3,
                                                      atten_mask=COMPRESSED)
        return out, smax, ssum


def test_fake_kernel_under_export():
    q, k, v = torch.randn(2, 6, 32), torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    ep = torch.export.export(_Training(), (q, k, v), strict=False)
    q2, k2, v2 = torch.randn_like(q), torch.randn_like(k), torch.randn_like(v)
    for g, w in zip(ep.module()(q2, k2, v2), _Training()(q2, k2, v2)):
        torch.testing.assert_close(g, w)


def test_export_with_dynamic_dims_specializes_mask_length():
    """Documented limitation: the `int mask_length` output is cast from a SymInt with a guard, so
    B*Skv (here) is frozen at its trace-time value."""
    q, k, v = torch.randn(2, 6, 32), torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    bd, sd = torch.export.Dim("b", min=1, max=8), torch.export.Dim("s", min=2, max=64)
    ep = torch.export.export(_Training(), (q, k, v), dynamic_shapes=({0: bd}, {0: bd, 1: sd}, {0: bd, 1: sd}),
                             strict=False)
    with pytest.raises(AssertionError, match="Guard failed"):
        ep.module()(torch.randn(3, 6, 32), torch.randn(3, 9, 16), torch.randn(3, 9, 16))


def test_compile_fullgraph_matches_eager():
    q, k, v = torch.randn(2, 6, 32), torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    compiled = torch.compile(_Training(), fullgraph=True, backend="aot_eager")
    for g, w in zip(compiled(q, k, v), _Training()(q, k, v)):
        torch.testing.assert_close(g, w)
    ints = torch.compile(lambda q, k, v: op(q, k, v, 4, "BSH")[4:], fullgraph=True, backend="aot_eager")(q, k, v)
    assert ints == (0, 0, 2 * 4 * 6 * 7)  # keep_prob == 1: seed/offset 0, mask_length from shapes


def test_tracing_with_dropout_is_refused():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(Exception, match="cannot be traced"):
        torch.compile(lambda q: op(q, q, q, 2, "BNSD", keep_prob=0.9)[0], fullgraph=True, backend="eager")(q)


# ----------------------------------------------------------------------------------- input checks

@pytest.mark.parametrize("kwargs,match", [
    (dict(input_layout="BSNH"), "The input_layout should be BSH/SBH/BNSD/BSND/TND"),
    (dict(padding_mask=torch.zeros(1)), "padding_mask is reserved"),
    (dict(keep_prob=0.0), r"keep_prob value must be in range of \(0, 1\]"),
    (dict(keep_prob=1.5), r"keep_prob value must be in range of \(0, 1\]"),
    (dict(sparse_mode=7), r"range of \[0,6\]"),
    (dict(sparse_mode=9), r"range of \[0,6\]"),
    (dict(head_num=3), "head_num is 3 but query has 2 heads"),
    (dict(inner_precise=5), "inner_precise is 5"),
    (dict(softmax_layout="TND"), "softmax_layout is 'TND' but input_layout is not"),
    (dict(softmax_layout="NTD"), "softmax_layout is 'NTD'"),
    (dict(sink=torch.zeros(3)), r"sink has shape \(3,\)"),
    (dict(sink=torch.zeros(2, dtype=torch.float16)), "sink has dtype"),
    (dict(pse=torch.zeros(1, 2, 4, 5)), r"pse has shape"),
    (dict(pse=torch.zeros(1, 2, 4, 6, dtype=torch.float16)), "pse has dtype"),
    (dict(atten_mask=torch.zeros(4, 6)), "atten_mask has dtype"),
    (dict(atten_mask=torch.zeros(4, 5, dtype=torch.bool)), "atten_mask has shape"),
    (dict(atten_mask=torch.zeros(4, 6, dtype=torch.bool), sparse_mode=3), "compressed mask"),
    (dict(atten_mask=PREFIX_MASK[:2048], sparse_mode=6, prefix=[3]), r"\(3072, 2048\) compressed prefix"),
    (dict(atten_mask=torch.zeros(1, 1, 4, 6, dtype=torch.bool), sparse_mode=5), "prefix is required"),
    (dict(atten_mask=torch.zeros(1, 1, 4, 6, dtype=torch.bool), sparse_mode=5, prefix=[1]), r"outside \[2, 6\]"),
    (dict(actual_seq_qlen=[4], actual_seq_kvlen=[6]), "use input_layout='TND'"),
])
def test_input_checks(kwargs, match):
    args = dict(query=torch.randn(1, 2, 4, 8), key=torch.randn(1, 2, 6, 8), value=torch.randn(1, 2, 6, 8),
                head_num=2, input_layout="BNSD")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        op(**args)


def test_tnd_checks():
    q = torch.randn(10, 2, 8)
    with pytest.raises(ValueError, match="are required with input_layout='TND'"):
        op(q, q, q, 2, "TND")
    with pytest.raises(ValueError, match="must be the same"):
        op(q, q, q, 2, "TND", actual_seq_qlen=[4, 10], actual_seq_kvlen=[10])
    with pytest.raises(ValueError, match="not non-decreasing"):
        op(q, q, q, 2, "TND", actual_seq_qlen=[4, 3], actual_seq_kvlen=[4, 10])
    with pytest.raises(ValueError, match="only 10 tokens"):
        op(q, q, q, 2, "TND", actual_seq_qlen=[4, 12], actual_seq_kvlen=[4, 10])
    with pytest.raises(ValueError, match=r"range of \[0,5\) or \(5,8\]"):
        op(q, q, q, 2, "TND", actual_seq_qlen=[4, 10], actual_seq_kvlen=[4, 10], sparse_mode=5)
    with pytest.raises(NotImplementedError, match="pse"):
        op(q, q, q, 2, "TND", actual_seq_qlen=[4, 10], actual_seq_kvlen=[4, 10], pse=torch.zeros(2, 2, 6, 6))


def test_tnd_trailing_zero_batches_and_tokens_past_the_end_are_zero():
    q = torch.randn(10, 2, 8)
    full = op(q, q, q, 2, "TND", actual_seq_qlen=[4, 8], actual_seq_kvlen=[4, 8])[0]
    trail = op(q, q, q, 2, "TND", actual_seq_qlen=[4, 8, 0], actual_seq_kvlen=[4, 8, 0])
    torch.testing.assert_close(trail[0], full)
    assert torch.count_nonzero(full[8:]) == 0
    assert trail[6] == 2 * (4 * 4 + 4 * 4)
