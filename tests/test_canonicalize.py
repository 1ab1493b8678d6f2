"""canonicalize: SDPA-exported models become one canonical graphgen.attention per layer, same logits."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim

from graphgen.capture.export import ATTENTION, attention_sites, capture, max_abs_error_vs_eager
from graphgen.passes.canonicalize import SDPA, canonicalize

from models import TINY, build_tiny, expected_windows

ATOL = 1e-5
SDPA_MODELS = ["llama", "qwen2", "mistral", "gpt2", "gpt_neox"]  # gemma2/gpt_oss: transformers has no SDPA path


@pytest.mark.slow
@pytest.mark.parametrize("model_type", SDPA_MODELS)
def test_sdpa_model_becomes_canonical(model_type):
    model = build_tiny(model_type, attn_implementation="sdpa")
    ep, record = capture(model, max_batch=4, max_seq_len=64)
    assert record.attention == [] and ep.graph.find_nodes(op="call_function", target=SDPA)

    gm, rec = canonicalize(ep.graph_module)
    n = model.config.num_hidden_layers
    assert (rec.matched, rec.skipped) == (n, [])
    assert not gm.graph.find_nodes(op="call_function", target=SDPA)
    sites = attention_sites(gm)
    assert [s.layer_idx for s in sites] == list(range(n))
    assert [s.sliding_window for s in sites] == expected_windows(model_type)
    kv = getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads
    assert {(s.num_heads, s.num_key_value_heads, s.causal) for s in sites} == {(4, kv, True)}  # repeat_kv gone
    assert max_abs_error_vs_eager(ep, model, [(1, 5), (3, 11)]) < ATOL


def test_works_on_unlifted_module():
    model = build_tiny("mistral", attn_implementation="sdpa")
    ep, _ = capture(model, max_batch=2, max_seq_len=32)
    gm = ep.module()
    ids = torch.randint(0, 300, (2, 9))
    pos = torch.arange(9).expand(2, 9)
    with torch.no_grad():
        before = gm(ids, pos)
        gm, rec = canonicalize(gm)
        after = gm(ids, pos)
    assert rec.matched == 2 and [s.sliding_window for s in attention_sites(gm)] == [4, 4]
    torch.testing.assert_close(after, before, atol=ATOL, rtol=0)


class _Attn(torch.nn.Module):
    """q (B, S, N*D) -> SDPA with the given options; `transpose_out` mimics HF's output layout."""

    def __init__(self, *, heads=4, kv_heads=2, repeat=True, mask=None, is_causal=False, transpose_out=True,
                 dropout=0.0):
        super().__init__()
        self.heads, self.kv_heads, self.repeat, self.mask = heads, kv_heads, repeat, mask
        self.is_causal, self.transpose_out, self.dropout = is_causal, transpose_out, dropout
        self.proj = torch.nn.Linear(16, 16 * (heads + 2 * kv_heads))

    def forward(self, x, position_ids):
        b, s, _ = x.shape
        q, k, v = self.proj(x).view(b, s, -1, 16).transpose(1, 2).split([self.heads, self.kv_heads, self.kv_heads], 1)
        gqa = {}
        if self.repeat:
            rep = self.heads // self.kv_heads
            k = k[:, :, None].expand(b, self.kv_heads, rep, s, 16).reshape(b, self.heads, s, 16)
            v = v[:, :, None].expand(b, self.kv_heads, rep, s, 16).reshape(b, self.heads, s, 16)
        else:
            gqa = {"enable_gqa": True}
        mask = None if self.mask is None else self.mask(position_ids)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.is_causal,
                                             dropout_p=self.dropout, **gqa)
        return out.transpose(1, 2) if self.transpose_out else out * 2.0


def _export(module, s=8):
    x = torch.randn(2, s, 16)
    pos = torch.arange(s).expand(2, s)
    batch, seq = Dim("batch", min=1, max=4), Dim("seq", min=2, max=32)
    shapes = {"x": {0: batch, 1: seq}, "position_ids": {0: batch, 1: seq}}
    return torch.export.export(module.eval(), (x, pos), dynamic_shapes=shapes, strict=False)


def _window(w):
    def mask(pos):
        q, k = pos[:, None, :, None], pos[:, None, None, :]
        return (k <= q) & (k > q - w)
    return mask


def _float_causal(pos):
    q, k = pos[:, None, :, None], pos[:, None, None, :]
    return torch.where(k <= q, 0.0, torch.finfo(torch.float32).min)


@pytest.mark.parametrize(
    "kwargs,causal,window",
    [
        (dict(is_causal=True), True, 0),
        (dict(is_causal=False), False, 0),
        (dict(is_causal=True, repeat=False), True, 0),
        (dict(is_causal=True, transpose_out=False), True, 0),  # the output is read in (B, N, S, D)
        (dict(mask=_window(3)), True, 3),
        (dict(mask=_float_causal), True, 0),
    ],
)
def test_sdpa_forms(kwargs, causal, window):
    ep = _export(_Attn(**kwargs))
    x, pos = torch.randn(3, 11, 16), torch.arange(11).expand(3, 11)
    want = ep.module()(x, pos)
    gm, rec = canonicalize(ep.graph_module)
    assert rec.matched == 1 and rec.skipped == []
    (site,) = attention_sites(gm)
    assert (site.causal, site.sliding_window, site.num_key_value_heads) == (causal, window, 2)
    torch.testing.assert_close(ep.module()(x, pos), want, atol=ATOL, rtol=0)


def test_unknown_mask_is_skipped_with_reason():
    def chunked(pos):  # block-diagonal chunks of 4: none of causal / window / full
        q, k = pos[:, None, :, None] // 4, pos[:, None, None, :] // 4
        return q == k

    ep = _export(_Attn(mask=chunked))
    gm, rec = canonicalize(ep.graph_module)
    assert rec.matched == 0 and len(rec.skipped) == 1
    assert "neither causal" in rec.skipped[0] and "layer 0" in rec.skipped[0]
    assert gm.graph.find_nodes(op="call_function", target=SDPA)
    assert not gm.graph.find_nodes(op="call_function", target=ATTENTION)


def test_mask_from_activations_is_skipped():
    class DataMask(_Attn):
        def forward(self, x, position_ids):
            self.mask = lambda pos: (x.sum(-1) > 0)[:, None, None, :]
            return super().forward(x, position_ids)

    ep = _export(DataMask())
    _, rec = canonicalize(ep.graph_module)
    assert rec.matched == 0 and "not a (batch, seq) int input" in rec.skipped[0]


def test_dropout_is_skipped():
    module = _Attn(is_causal=True, dropout=0.1)
    module.train()
    x, pos = torch.randn(2, 8, 16), torch.arange(8).expand(2, 8)
    ep = torch.export.export(module, (x, pos), strict=False)
    _, rec = canonicalize(ep.graph_module)
    assert rec.matched == 0 and "dropout_p=0.1" in rec.skipped[0]


def test_every_tiny_sdpa_model_is_listed():
    assert set(SDPA_MODELS) <= set(TINY)
