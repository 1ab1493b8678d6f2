"""Fake kernels: IFA/PFA/FIA (exact and tensor_lengths overloads) trace under torch.export with
dynamic batch/seq dims and under torch.compile(fullgraph=True, dynamic=True), and match eager."""
from __future__ import annotations

import pytest
import torch
from torch.export import Dim

import graphgen.ops  # noqa: F401

G = torch.ops.graphgen
MASK2048 = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), 1)


class Decode(torch.nn.Module):
    """IFA / FIA over a paged BNSD cache, lengths as a graph input (the portable decode graph)."""

    def __init__(self, op: str):
        super().__init__()
        self.op = op

    def forward(self, q, k_cache, v_cache, block_table, seq_lens):
        if self.op == "ifa":
            return G.npu_incre_flash_attention.tensor_lengths(
                q, k_cache, v_cache, actual_seq_lengths=seq_lens, block_table=block_table, block_size=16,
                num_heads=4, num_key_value_heads=2, scale_value=0.25, input_layout="BNSD")
        out, lse = G.npu_fused_infer_attention_score.tensor_lengths(
            q, k_cache, v_cache, actual_seq_lengths_kv=seq_lens, block_table=block_table, block_size=16,
            num_heads=4, num_key_value_heads=2, scale=0.25, input_layout="BNSD", softmax_lse_flag=True)
        return out, lse


class Prefill(torch.nn.Module):
    """PFA / FIA varlen (TND), cumulative lengths as graph inputs."""

    def __init__(self, op: str):
        super().__init__()
        self.op = op

    def forward(self, q, k, v, q_ends, kv_ends):
        if self.op == "pfa":
            return G.npu_prompt_flash_attention.tensor_lengths(
                q, k, v, actual_seq_lengths=q_ends, actual_seq_lengths_kv=kv_ends, num_heads=4,
                num_key_value_heads=2, scale_value=0.25, input_layout="TND", sparse_mode=3, atten_mask=MASK2048)
        return G.npu_fused_infer_attention_score.tensor_lengths(
            q, k, v, actual_seq_lengths=q_ends, actual_seq_lengths_kv=kv_ends, num_heads=4,
            num_key_value_heads=2, scale=0.25, input_layout="TND", sparse_mode=3, atten_mask=MASK2048,
            softmax_lse_flag=True)


def decode_inputs(batch: int):
    q = torch.randn(batch, 4, 1, 32)
    cache = torch.randn(12, 2, 16, 32)
    table = torch.randint(0, 12, (batch, 3), dtype=torch.int32)
    lens = torch.randint(1, 48, (batch,), dtype=torch.int32)
    return q, cache, cache.clone(), table, lens


def prefill_inputs(lens):
    t = sum(lens)
    ends = torch.tensor(lens).cumsum(0).to(torch.int32)
    return torch.randn(t, 4, 32), torch.randn(t, 2, 32), torch.randn(t, 2, 32), ends, ends.clone()


def close(a, b):
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("op", ["ifa", "fia"])
def test_decode_exports_with_dynamic_batch(op):
    batch = Dim("batch", min=1, max=64)
    ep = torch.export.export(Decode(op), decode_inputs(3),
                             dynamic_shapes=({0: batch}, None, None, {0: batch}, {0: batch}))
    for b in (2, 5):
        inputs = decode_inputs(b)
        close(ep.module()(*inputs), Decode(op)(*inputs))


@pytest.mark.parametrize("op", ["pfa", "fia"])
def test_varlen_prefill_exports_with_dynamic_tokens_and_batch(op):
    tokens, batch = Dim("tokens", min=2, max=4096), Dim("batch", min=1, max=64)
    ep = torch.export.export(Prefill(op), prefill_inputs([3, 5]),
                             dynamic_shapes=({0: tokens}, {0: tokens}, {0: tokens}, {0: batch}, {0: batch}))
    for lens in ([4, 1, 6], [9]):
        inputs = prefill_inputs(lens)
        close(ep.module()(*inputs), Prefill(op)(*inputs))


def padded(q_seq: int, batch: int = 2):
    return (torch.randn(batch, q_seq, 4 * 32), torch.randn(batch, 8, 2 * 32), torch.randn(batch, 8, 2 * 32))


def exact_ops(q, k, v):
    """Every exact-schema op, int-list lengths as constants (torch_npu's form)."""
    b = q.shape[0]
    outs = [
        G.npu_prompt_flash_attention(q, k, v, num_heads=4, num_key_value_heads=2, scale_value=0.25,
                                     sparse_mode=3, atten_mask=MASK2048),
        *G.npu_fused_infer_attention_score(q, k, v, num_heads=4, num_key_value_heads=2, scale=0.25,
                                           sparse_mode=3, atten_mask=MASK2048, softmax_lse_flag=True),
        G.npu_incre_flash_attention(q[:, :1], k, v, num_heads=4, num_key_value_heads=2, scale_value=0.25,
                                    actual_seq_lengths=[5] * b),
        G.npu_prompt_flash_attention(q, k, v, num_heads=4, num_key_value_heads=2, quant_scale2=torch.tensor([20.0])),
    ]
    return tuple(outs)


def test_exact_schemas_export_with_dynamic_seq_and_match_eager():
    seq = Dim("seq", min=2, max=512)

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return exact_ops(q, k, v)

    ep = torch.export.export(M(), padded(4), dynamic_shapes=({1: seq}, None, None))
    inputs = padded(6)
    got, want = ep.module()(*inputs), exact_ops(*inputs)
    assert got[-1].dtype == torch.int8
    close(got, want)


def test_compile_fullgraph_dynamic_matches_eager():
    torch._dynamo.reset()
    compiled = torch.compile(exact_ops, fullgraph=True, dynamic=True, backend="eager")
    for s in (3, 7):
        inputs = padded(s)
        close(compiled(*inputs), exact_ops(*inputs))
    decode = torch.compile(Decode("fia"), fullgraph=True, dynamic=True, backend="aot_eager")
    for b in (2, 3):
        inputs = decode_inputs(b)
        close(decode(*inputs), Decode("fia")(*inputs))
    prefill = torch.compile(Prefill("pfa"), fullgraph=True, dynamic=True, backend="aot_eager")
    for lens in ([2, 3], [4, 1, 5]):
        inputs = prefill_inputs(lens)
        close(prefill(*inputs), Prefill("pfa")(*inputs))


def test_fake_shapes_for_int8_and_lse():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        q8, k8 = torch.empty(2, 3, 64, dtype=torch.int8), torch.empty(2, 5, 64, dtype=torch.int8)
        one = torch.ones(1)
        out = G.npu_prompt_flash_attention(q8, k8, k8, num_heads=2, deq_scale1=one, quant_scale1=one, deq_scale2=one)
        assert out.shape == (2, 3, 64) and out.dtype == torch.float16
        q = torch.empty(2, 1, 64, dtype=torch.bfloat16)
        o, lse = G.npu_fused_infer_attention_score(q, k8, k8, num_heads=2, antiquant_scale=torch.ones(2),
                                                   quant_scale2=one, softmax_lse_flag=True)
        assert o.dtype == torch.int8 and lse.shape == (2, 2, 1, 1) and lse.dtype == torch.float32
        o, lse = G.npu_fused_infer_attention_score(torch.empty(7, 2, 32), torch.empty(9, 2, 32),
                                                   torch.empty(9, 2, 32), num_heads=2, input_layout="TND",
                                                   actual_seq_lengths=[3, 7], actual_seq_lengths_kv=[4, 9],
                                                   softmax_lse_flag=True)
        assert o.shape == (7, 2, 32) and lse.shape == (7, 2, 1)
