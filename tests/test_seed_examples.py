"""Every code example of the seed document (reference/seed-npu-flash-attention.md) run under
graphgen's emulation on CPU, `.npu()` dropped, `torch_npu = graphgen.ops.emulate()`.

Where an example is wrong against the exact torch_npu schema, the test asserts the error the exact
schema gives and then runs the corrected call; a comment says what the document got wrong.
"""
from __future__ import annotations

import math

import pytest
import torch

import graphgen.ops
from graphgen.ops import fusion_attention

torch_npu = graphgen.ops.emulate()
COMPRESSED_CAUSAL = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)


# ------------------------------------------------------------------------- 1. training examples

def test_1_training_basic():
    batch_size, seq_len, num_heads, head_dim = 2, 512, 8, 64
    query = torch.randn(batch_size, seq_len, num_heads, head_dim, dtype=torch.float16)
    key = torch.randn(batch_size, seq_len, num_heads, head_dim, dtype=torch.float16)
    value = torch.randn(batch_size, seq_len, num_heads, head_dim, dtype=torch.float16)
    atten_mask = torch.triu(torch.ones(seq_len, seq_len), diagonal=1).bool()
    kwargs = dict(head_num=num_heads, scale=1.0 / math.sqrt(head_dim), keep_prob=0.9, atten_mask=atten_mask,
                  sparse_mode=0)
    # The document passes input_layout="BSNH", which torch_npu does not know (BSH/SBH/BSND/BNSD/TND,
    # case-insensitive): a (B, S, N, D) tensor is "BSND".
    with pytest.raises(ValueError, match="The input_layout should be BSH/SBH/BNSD/BSND/TND"):
        torch_npu.npu_fusion_attention(query, key, value, input_layout="BSNH", **kwargs)
    attn_out, softmax_max, softmax_sum, _, seed, offset, mask_len = torch_npu.npu_fusion_attention(
        query, key, value, input_layout="BSND", **kwargs)
    assert attn_out.shape == (2, 512, 8, 64) and attn_out.dtype == torch.float16  # the document's [2, 512, 8, 64]
    assert softmax_max.shape == softmax_sum.shape == (2, 8, 512, 8) and softmax_max.dtype == torch.float32
    assert mask_len == 2 * 8 * 512 * 512
    keep = fusion_attention.dropout_keep_mask(seed, offset, (2, 8, 512, 512), 0.9, "cpu")
    assert abs(keep.float().mean().item() - 0.9) < 0.01


def test_1_training_varlen():
    total_tokens, num_heads, head_dim = 1000, 8, 64
    query = torch.randn(total_tokens, num_heads, head_dim, dtype=torch.float16)
    key = torch.randn(total_tokens, num_heads, head_dim, dtype=torch.float16)
    value = torch.randn(total_tokens, num_heads, head_dim, dtype=torch.float16)
    actual_seq_qlen = [100, 300, 450, 1000]  # cumulative ends: lengths 100, 200, 150, 550
    actual_seq_kvlen = [100, 300, 450, 1000]
    attn_out, *rest = torch_npu.npu_fusion_attention(
        query, key, value, head_num=num_heads, input_layout="TND", scale=1.0 / math.sqrt(head_dim),
        actual_seq_qlen=actual_seq_qlen, actual_seq_kvlen=actual_seq_kvlen, sparse_mode=0)
    assert attn_out.shape == (1000, 8, 64) and attn_out.dtype == torch.float16
    assert rest[0].shape == (1000, 8, 8)
    assert rest[-1] == 8 * (100 * 100 + 200 * 200 + 150 * 150 + 550 * 550)
    # Sequence 2 (tokens 100..299) attends only to itself: recompute it alone.
    alone = torch_npu.npu_fusion_attention(query[100:300], key[100:300], value[100:300], head_num=8,
                                           input_layout="TND", scale=1.0 / math.sqrt(head_dim),
                                           actual_seq_qlen=[200], actual_seq_kvlen=[200])[0]
    torch.testing.assert_close(attn_out[100:300], alone)


# ----------------------------------------------------------------------------------- 2. IFA

def test_2_ifa_single_op_and_graph_mode():
    head_dim = 128
    # "假设已经构造好 query, key, value": BSH with num_heads=8 -> H = 1024; decode S = 1.
    query = torch.randn(2, 1, 8 * head_dim, dtype=torch.float16)
    key = torch.randn(2, 40, 8 * head_dim, dtype=torch.float16)
    value = torch.randn(2, 40, 8 * head_dim, dtype=torch.float16)
    atten_out = torch_npu.npu_incre_flash_attention(query, key, value, num_heads=8,
                                                    scale_value=1.0 / math.sqrt(head_dim), input_layout="BSH")
    assert atten_out.shape == query.shape and atten_out.dtype == query.dtype  # "与输入 query 形状一致"

    # The document's "graph mode" uses @torch.jit.script; TorchScript cannot compile a call into the
    # torch_npu Python module (upstream graph mode is torch.compile with torchair's backend).
    def model(q, k, v):
        return torch_npu.npu_incre_flash_attention(q, k, v, num_heads=8, scale_value=1.0 / math.sqrt(head_dim),
                                                   input_layout="BSH")

    with pytest.raises(Exception):
        torch.jit.script(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(query, key, value), atten_out)


# ----------------------------------------------------------------------------------- 5.1 PFA

def _pfa_inputs():
    batch_size, query_len, kv_len = 1, 64, 64
    num_heads, head_dim = 8, 128
    query = torch.randn(batch_size, query_len, num_heads, head_dim, dtype=torch.float16)
    key = torch.randn(batch_size, kv_len, num_heads, head_dim, dtype=torch.float16)
    value = torch.randn(batch_size, kv_len, num_heads, head_dim, dtype=torch.float16)
    return query, key, value, 1.0 / math.sqrt(head_dim)


def test_5_1_pfa_corrected():
    query, key, value, scale = _pfa_inputs()
    # The tensors are (B, S, N, D) = (1, 64, 8, 128): input_layout must be "BSND", not "BNSD".
    # sparse_mode=3 takes the (2048, 2048) compressed causal mask.
    prefill_out = torch_npu.npu_prompt_flash_attention(
        query, key, value, num_heads=8, scale_value=scale, input_layout="BSND", sparse_mode=3,
        pre_tokens=65535, next_tokens=0, atten_mask=COMPRESSED_CAUSAL)
    assert prefill_out.shape == (1, 64, 8, 128) and prefill_out.dtype == torch.float16  # the document's shape
    # Causal: the first token only sees itself, so its output is its own value.
    torch.testing.assert_close(prefill_out[:, 0], value[:, 0], atol=2e-3, rtol=2e-3)


def test_5_1_pfa_as_written_is_flagged():
    query, key, value, scale = _pfa_inputs()
    # As written, the (1, 64, 8, 128) query declared "BNSD" reads as 64 heads of 8 tokens; graphgen's
    # PFA says so (a warning, not an error: it follows the tensor's head dim) and the result is
    # not the document's intended causal prefill.
    with pytest.warns(UserWarning, match="num_heads=8 but the BNSD query has 64 heads"):
        out = torch_npu.npu_prompt_flash_attention(query, key, value, num_heads=8, scale_value=scale,
                                                   input_layout="BNSD", sparse_mode=3, pre_tokens=65535,
                                                   next_tokens=0, atten_mask=COMPRESSED_CAUSAL)
    corrected = torch_npu.npu_prompt_flash_attention(query, key, value, num_heads=8, scale_value=scale,
                                                     input_layout="BSND", sparse_mode=3, pre_tokens=65535,
                                                     next_tokens=0, atten_mask=COMPRESSED_CAUSAL)
    assert not torch.allclose(out.float(), corrected.float(), atol=1e-2)


# ----------------------------------------------------------------------------------- 5.2 FIA

def attention_inference(query, key_cache, value_cache, num_heads, head_dim, kv_len):
    """The document's function, corrected: `scale=` (FIA has no scale_value), input_layout "BSND"
    (the tensors are (B, S, N, D)), actual_seq_lengths = the query's length (not kv_len), and the
    compressed mask that sparse_mode=3 expects."""
    scale = 1.0 / math.sqrt(head_dim)
    return torch_npu.npu_fused_infer_attention_score(
        query, key_cache, value_cache, num_heads=num_heads, scale=scale, input_layout="BSND",
        actual_seq_lengths=[query.shape[1]], actual_seq_lengths_kv=[kv_len], sparse_mode=3, pre_tokens=65535,
        next_tokens=0, atten_mask=COMPRESSED_CAUSAL, softmax_lse_flag=True)


def test_5_2_fia():
    num_heads, head_dim, kv_len = 8, 64, 100
    key_cache = torch.randn(1, kv_len, num_heads, head_dim, dtype=torch.float16)
    value_cache = torch.randn(1, kv_len, num_heads, head_dim, dtype=torch.float16)
    query_prefill = torch.randn(1, 64, num_heads, head_dim, dtype=torch.float16)
    query_decode = torch.randn(1, 1, num_heads, head_dim, dtype=torch.float16)
    doc_kwargs = dict(num_heads=num_heads, input_layout="BNSD", actual_seq_lengths=[kv_len],
                      actual_seq_lengths_kv=[kv_len], sparse_mode=3, pre_tokens=65535, next_tokens=0,
                      softmax_lse_flag=True)
    # As written: `scale_value=` is not an argument of npu_fused_infer_attention_score (it is `scale`).
    with pytest.raises(RuntimeError, match="Unknown keyword argument 'scale_value'"):
        torch_npu.npu_fused_infer_attention_score(query_prefill, key_cache, value_cache, scale_value=0.125,
                                                  **doc_kwargs)
    # With `scale=` but still "BNSD", (1, 100, 8, 64) reads as 100 KV heads.
    with pytest.raises(ValueError, match="num_key_value_heads"):
        torch_npu.npu_fused_infer_attention_score(query_prefill, key_cache, value_cache, scale=0.125, **doc_kwargs)
    # actual_seq_lengths is the query's length: kv_len (100) exceeds the 64-token prefill query.
    with pytest.raises(ValueError, match=r"actual_seq_lengths \[100\] is outside \[0, 64\]"):
        torch_npu.npu_fused_infer_attention_score(query_prefill, key_cache, value_cache, scale=0.125,
                                                  **{**doc_kwargs, "input_layout": "BSND"})

    prefill_out, prefill_lse = attention_inference(query_prefill, key_cache, value_cache, num_heads, head_dim, kv_len)
    decode_out, decode_lse = attention_inference(query_decode, key_cache, value_cache, num_heads, head_dim, kv_len)
    assert prefill_out.shape == (1, 64, 8, 64) and prefill_out.dtype == torch.float16
    assert prefill_lse.shape == (1, 8, 64, 1) and prefill_lse.dtype == torch.float32
    assert decode_out.shape == (1, 1, 8, 64) and decode_lse.shape == (1, 8, 1, 1)


# ----------------------------------------------------------------------------------- 5.3 advance step

def test_5_3_advance_step():
    num_seqs, num_queries, block_size = 16, 8, 16
    input_tokens = torch.randint(0, 10000, (num_seqs,), dtype=torch.int64)
    input_positions = torch.randint(0, 1000, (num_seqs,), dtype=torch.int64)
    seq_lens = torch.randint(1, 100, (num_seqs,), dtype=torch.int64)
    slot_mapping = torch.randint(0, 1000, (num_seqs,), dtype=torch.int64)
    sampled_token_ids = torch.randint(0, 10000, (num_queries, 1), dtype=torch.int64)
    max_blocks_per_seq = 64
    block_tables = torch.randint(0, 1000, (num_seqs, max_blocks_per_seq), dtype=torch.int64)
    old_lens = seq_lens.clone()
    torch_npu.npu_advance_step_flashattn(input_tokens, sampled_token_ids, input_positions, seq_lens, slot_mapping,
                                         block_tables, num_seqs, num_queries, block_size)
    assert torch.equal(input_tokens[:8], sampled_token_ids[:, 0])
    assert torch.equal(input_positions[:8], old_lens[:8]) and torch.equal(seq_lens[:8], old_lens[:8] + 1)
    rows = torch.arange(8)
    want_slots = block_tables[rows, old_lens[:8] // block_size] * block_size + old_lens[:8] % block_size
    assert torch.equal(slot_mapping[:8], want_slots)
    assert torch.equal(seq_lens[8:], old_lens[8:])


# ----------------------------------------------------------------------------------- 6.1 mini-vLLM

class NPUAttention:
    """The document's class, corrected: layouts are "BSND" (its tensors are (B, S, N, D)); PFA/FIA
    with sparse_mode=3 get the compressed causal mask; FIA takes `scale`; paged IFA lengths are an
    int list and the block table int32 (the document passes a tensor and, in main, no table)."""

    def __init__(self, num_heads: int, head_dim: int, block_size: int = 16):
        self.num_heads, self.head_dim, self.block_size = num_heads, head_dim, block_size
        self.scale = 1.0 / math.sqrt(head_dim)

    def prefill_attention(self, query, key, value):
        return torch_npu.npu_prompt_flash_attention(
            query, key, value, num_heads=self.num_heads, scale_value=self.scale, input_layout="BSND",
            sparse_mode=3, pre_tokens=65535, next_tokens=0, atten_mask=COMPRESSED_CAUSAL)

    def decode_attention(self, query, key_cache, value_cache, seq_lengths: list[int], block_table=None):
        kwargs = {"num_heads": self.num_heads, "scale_value": self.scale, "input_layout": "BSND",
                  "actual_seq_lengths": seq_lengths}
        if block_table is not None:
            kwargs.update({"block_table": block_table, "block_size": self.block_size})
        return torch_npu.npu_incre_flash_attention(query, key_cache, value_cache, **kwargs)

    def unified_inference(self, query, key_cache, value_cache, seq_length: int):
        return torch_npu.npu_fused_infer_attention_score(
            query, key_cache, value_cache, num_heads=self.num_heads, scale=self.scale, input_layout="BSND",
            actual_seq_lengths=[query.shape[1]], actual_seq_lengths_kv=[seq_length], sparse_mode=3,
            pre_tokens=65535, next_tokens=0, atten_mask=COMPRESSED_CAUSAL, softmax_lse_flag=True)


def test_6_1_mini_vllm():
    attention = NPUAttention(num_heads=8, head_dim=128, block_size=16)
    batch_size, seq_len, max_kv_len = 1, 64, 1024
    query = torch.randn(batch_size, seq_len, 8, 128, dtype=torch.float16)
    key_cache = torch.randn(batch_size, max_kv_len, 8, 128, dtype=torch.float16)
    value_cache = torch.randn(batch_size, max_kv_len, 8, 128, dtype=torch.float16)

    prefill_out = attention.prefill_attention(query, key_cache[:, :seq_len], value_cache[:, :seq_len])
    assert prefill_out.shape == (1, 64, 8, 128) and prefill_out.dtype == torch.float16

    decode_query = torch.randn(batch_size, 1, 8, 128, dtype=torch.float16)
    # As written: the (B, S, N, D) decode query declared "BNSD" reads as S = 8 tokens.
    with pytest.raises(ValueError, match="query has S = 8"):
        torch_npu.npu_incre_flash_attention(decode_query, key_cache, value_cache, num_heads=8,
                                            scale_value=attention.scale, input_layout="BNSD")
    decode_out = attention.decode_attention(decode_query, key_cache, value_cache, [seq_len])
    assert decode_out.shape == (1, 1, 8, 128) and decode_out.dtype == torch.float16
    # Only the first seq_len cached positions count: equal to attending over the slice.
    sliced = attention.decode_attention(decode_query, key_cache[:, :seq_len], value_cache[:, :seq_len], [seq_len])
    torch.testing.assert_close(decode_out, sliced)

    # The paged branch: cache (num_blocks, block_size, H), block table int32, lengths as a list.
    blocks = key_cache[0, :seq_len].reshape(seq_len // 16, 16, 8 * 128)
    vblocks = value_cache[0, :seq_len].reshape(seq_len // 16, 16, 8 * 128)
    table = torch.arange(seq_len // 16).view(1, -1)
    with pytest.raises(ValueError, match="block_table has dtype int64"):  # the document's int64 table
        attention.decode_attention(decode_query, blocks, vblocks, [seq_len], block_table=table)
    paged = attention.decode_attention(decode_query, blocks, vblocks, [seq_len], block_table=table.to(torch.int32))
    torch.testing.assert_close(paged, sliced)
    # The document passes seq_lengths as a tensor to IFA's SymInt[]: eagerly torch's argument parser
    # turns a 1-D integer tensor into an int list, but a captured graph cannot read tensor values
    # into an int list without leaving the graph.
    lengths_tensor = torch.tensor([seq_len], dtype=torch.int32)
    torch.testing.assert_close(attention.decode_attention(decode_query, key_cache, value_cache, lengths_tensor),
                               decode_out)
    with pytest.raises(Exception):
        torch.compile(attention.decode_attention, fullgraph=True, backend="eager")(
            decode_query, key_cache, value_cache, lengths_tensor)

    out, lse = attention.unified_inference(query, key_cache[:, :seq_len], value_cache[:, :seq_len], seq_len)
    assert out.shape == (1, 64, 8, 128) and lse.shape == (1, 8, 64, 1)
    torch.testing.assert_close(out, prefill_out)


# ----------------------------------------------------------------------------------- 6.2 quantized

def test_6_2_quantized():
    batch_size, seq_len, num_heads, head_dim = 1, 1, 8, 64
    query = torch.randn(batch_size, seq_len, num_heads, head_dim, dtype=torch.float16)
    key_int8 = torch.randint(-128, 127, (1, 100, num_heads, head_dim), dtype=torch.int8)
    value_int8 = torch.randint(-128, 127, (1, 100, num_heads, head_dim), dtype=torch.int8)
    dequant_scale1 = torch.randn(1, dtype=torch.float32)
    quant_scale2 = torch.rand(1, dtype=torch.float32) + 0.5
    quant_offset2 = torch.randn(1, dtype=torch.float32)
    common = dict(quant_scale2=quant_scale2, quant_offset2=quant_offset2, num_heads=num_heads,
                  scale_value=1.0 / math.sqrt(head_dim))
    # As written: "BNSD" for (B, S, N, D) tensors (S = 8 tokens), and ...
    with pytest.raises(ValueError, match="query has S = 8"):
        torch_npu.npu_incre_flash_attention(query, key_int8, value_int8, dequant_scale1=dequant_scale1,
                                            input_layout="BNSD", **common)
    # ... dequant_scale1 belongs to the all-int8 path: an fp16 query with int8 KV is the antiquant
    # path (antiquant_scale/offset dequantize K and V), with quant_scale2/offset2 giving int8 output.
    with pytest.raises(ValueError, match="dequant_scale1 is not allowed with a float16 query"):
        torch_npu.npu_incre_flash_attention(query, key_int8, value_int8, dequant_scale1=dequant_scale1,
                                            input_layout="BSND", **common)
    antiquant_scale = torch.full((2, num_heads, head_dim), 0.01, dtype=torch.float16)
    atten_out_int8 = torch_npu.npu_incre_flash_attention(query, key_int8, value_int8, antiquant_scale=antiquant_scale,
                                                         input_layout="BSND", **common)
    assert atten_out_int8.shape == (1, 1, 8, 64) and atten_out_int8.dtype == torch.int8
