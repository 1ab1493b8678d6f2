"""Each input check of IFA/PFA/FIA raises its documented, actionable error."""
from __future__ import annotations

import pytest
import torch

import graphgen.ops  # noqa: F401

ifa = torch.ops.graphgen.npu_incre_flash_attention
pfa = torch.ops.graphgen.npu_prompt_flash_attention
fia = torch.ops.graphgen.npu_fused_infer_attention_score
MASK2048 = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), 1)


def t(*shape, dtype=torch.float16):
    return torch.randn(*shape).to(dtype) if dtype != torch.int8 else torch.randint(-5, 5, shape, dtype=dtype)


def test_layout_rank_mismatch():
    with pytest.raises(ValueError, match=r"query has 4 dims .* input_layout='BSH' needs 3"):
        pfa(t(1, 2, 3, 16), t(1, 2, 3, 16), t(1, 2, 3, 16), num_heads=2)
    with pytest.raises(ValueError, match=r"key has 3 dims"):
        pfa(t(1, 2, 3, 16), t(1, 3, 32), t(1, 3, 32), input_layout="BNSD", num_heads=2)


def test_unknown_layout_and_tnd_in_ifa():
    with pytest.raises(ValueError, match=r"input_layout is 'SBH'.*pass one of 'BSH', 'BNSD', 'BSND', 'TND'"):
        pfa(t(3, 1, 32), t(3, 1, 32), t(3, 1, 32), input_layout="SBH", num_heads=2)
    with pytest.raises(ValueError, match=r"input_layout is 'TND'.*pass one of 'BSH', 'BNSD', 'BSND'"):
        ifa(t(3, 2, 16), t(3, 2, 16), t(3, 2, 16), input_layout="TND", num_heads=2)


def test_head_dim_alignment():
    with pytest.raises(ValueError, match=r"head_dim is 24, not a multiple of 16.*e\.g\. 32"):
        pfa(t(1, 2, 3, 24), t(1, 2, 3, 24), t(1, 2, 3, 24), input_layout="BNSD", num_heads=2)
    with pytest.raises(ValueError, match=r"head_dim is 16, not a multiple of 32 \(required by int8 key/value\)"):
        ifa(t(1, 2, 1, 16), t(1, 2, 3, 16, dtype=torch.int8), t(1, 2, 3, 16, dtype=torch.int8),
            input_layout="BNSD", num_heads=2, antiquant_scale=torch.ones(2))


def test_gqa_ratio_and_divisibility():
    with pytest.raises(ValueError, match=r"num_key_value_heads \(3\) does not divide num_heads \(4\)"):
        pfa(t(1, 2, 64), t(1, 2, 48), t(1, 2, 48), num_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match=r"ratio is 128, above 64"):
        pfa(t(1, 128, 1, 16), t(1, 1, 1, 16), t(1, 1, 1, 16), num_heads=128, input_layout="BNSD")


def test_bsh_hidden_vs_num_heads():
    with pytest.raises(ValueError, match=r"num_heads \(3\) does not divide the hidden size of query \(64\)"):
        pfa(t(1, 2, 64), t(1, 2, 64), t(1, 2, 64), num_heads=3)


def test_sparse_mode_range():
    with pytest.raises(ValueError, match=r"sparse_mode is 5, out of range.*pass one of 0, 1, 2, 3, 4"):
        pfa(t(1, 2, 32), t(1, 2, 32), t(1, 2, 32), num_heads=2, sparse_mode=5)
    with pytest.raises(ValueError, match=r"atten_mask is required with sparse_mode=1"):
        fia(t(1, 2, 32), t(1, 2, 32), t(1, 2, 32), num_heads=2, sparse_mode=1)


@pytest.mark.parametrize("shape", [(4, 4), (1, 2048, 1024), (2, 2048, 2048)])
def test_compressed_mask_shape(shape):
    with pytest.raises(ValueError, match=r"takes the compressed mask.*torch\.triu\(torch\.ones\(2048, 2048"):
        pfa(t(1, 4, 32), t(1, 4, 32), t(1, 4, 32), num_heads=2, sparse_mode=3,
            atten_mask=torch.ones(shape, dtype=torch.bool))


def test_paged_needs_lengths_block_size_and_int32_table():
    q, cache = t(2, 1, 32), t(4, 16, 32)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"actual_seq_lengths is required with block_table"):
        ifa(q, cache, cache, num_heads=2, block_table=table, block_size=16)
    with pytest.raises(ValueError, match=r"actual_seq_lengths_kv is required with block_table"):
        fia(q, cache, cache, num_heads=2, block_table=table, block_size=16, actual_seq_lengths=[1, 1])
    with pytest.raises(ValueError, match=r"block_table has dtype int64.*int32 only: pass block_table.to\(torch.int32\)"):
        ifa(q, cache, cache, num_heads=2, block_table=table.long(), block_size=16, actual_seq_lengths=[3, 3])
    with pytest.raises(ValueError, match=r"block_size is 0 with block_table given; pass block_size=16"):
        ifa(q, cache, cache, num_heads=2, block_table=table, actual_seq_lengths=[3, 3])
    with pytest.raises(ValueError, match=r"block_size \(32\) differs from the KV cache's block dimension \(16\)"):
        ifa(q, cache, cache, num_heads=2, block_table=table, block_size=32, actual_seq_lengths=[3, 3])
    with pytest.raises(ValueError, match=r"block_size is 16 but no block_table"):
        ifa(q, t(2, 5, 32), t(2, 5, 32), num_heads=2, block_size=16)
    with pytest.raises(ValueError, match=r"key is the paged KV cache.*\(num_blocks, num_key_value_heads, block_size"):
        ifa(t(2, 2, 1, 16), cache, cache, num_heads=2, input_layout="BNSD", block_table=table, block_size=16,
            actual_seq_lengths=[3, 3])


def test_block_table_range_and_width():
    q, cache = t(2, 1, 32), t(4, 16, 32)
    table = torch.tensor([[0, 9], [2, -1]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"block_table has entries outside \[0, 4\)"):
        ifa(q, cache, cache, num_heads=2, block_table=table, block_size=16, actual_seq_lengths=[20, 3])
    # -1 / out-of-range entries in blocks the lengths do not reach are fine
    ifa(q, cache, cache, num_heads=2, block_table=table, block_size=16, actual_seq_lengths=[16, 3])
    with pytest.raises(ValueError, match=r"block_table holds 2 blocks of 16 tokens.*wider block_table"):
        ifa(q, cache, cache, num_heads=2, block_table=table, block_size=16, actual_seq_lengths=[40, 3])


def test_lengths_checks():
    with pytest.raises(ValueError, match=r"actual_seq_lengths has 3 entries for batch 2"):
        ifa(t(2, 1, 32), t(2, 5, 32), t(2, 5, 32), num_heads=2, actual_seq_lengths=[1, 2, 3])
    with pytest.raises(ValueError, match=r"actual_seq_lengths_kv \[6, 1\] is outside \[0, 5\]"):
        pfa(t(2, 3, 32), t(2, 5, 32), t(2, 5, 32), num_heads=2, actual_seq_lengths_kv=[6, 1])
    with pytest.raises(ValueError, match=r"actual_seq_lengths is required for input_layout='TND'.*\[2, 4, 6\]"):
        pfa(t(6, 2, 16), t(6, 2, 16), t(6, 2, 16), num_heads=2, input_layout="TND")
    with pytest.raises(ValueError, match=r"not cumulative ends"):
        pfa(t(6, 2, 16), t(6, 2, 16), t(6, 2, 16), num_heads=2, input_layout="TND",
            actual_seq_lengths=[4, 2], actual_seq_lengths_kv=[2, 6])
    with pytest.raises(ValueError, match=r"1-D int32/int64 tensor"):
        torch.ops.graphgen.npu_incre_flash_attention.tensor_lengths(
            t(2, 1, 32), t(2, 5, 32), t(2, 5, 32), num_heads=2, actual_seq_lengths=torch.tensor([1.0, 2.0]))


def test_padding_mask_rejected():
    with pytest.raises(ValueError, match=r"padding_mask is not allowed \(reserved upstream"):
        ifa(t(1, 1, 32), t(1, 3, 32), t(1, 3, 32), num_heads=2, padding_mask=torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"padding_mask is not allowed"):
        pfa(t(1, 2, 32), t(1, 3, 32), t(1, 3, 32), num_heads=2, padding_mask=torch.zeros(1, 3))


def test_kv_padding_rules():
    with pytest.raises(ValueError, match=r"actual_seq_lengths is required with kv_padding_size"):
        ifa(t(1, 1, 32), t(1, 3, 32), t(1, 3, 32), num_heads=2, kv_padding_size=torch.tensor([1]))


def test_quant_combinations():
    i8 = lambda *s: t(*s, dtype=torch.int8)  # noqa: E731
    one = torch.ones(1)
    with pytest.raises(ValueError, match=r"all int8, which the incremental \(Q_S = 1\) kernel forbids"):
        ifa(i8(1, 1, 64), i8(1, 3, 64), i8(1, 3, 64), num_heads=2)
    with pytest.raises(ValueError, match=r"deq_scale1 is required for int8 query/key/value"):
        pfa(i8(1, 2, 64), i8(1, 3, 64), i8(1, 3, 64), num_heads=2)
    with pytest.raises(ValueError, match=r"quant_offset2 is not allowed without quant_scale2 \(int8 in, float16 out\)"):
        pfa(i8(1, 2, 64), i8(1, 3, 64), i8(1, 3, 64), num_heads=2, deq_scale1=one, quant_scale1=one,
            deq_scale2=one, quant_offset2=one)
    with pytest.raises(ValueError, match=r"dequant_scale1 is not allowed with a float16 query"):
        ifa(t(1, 1, 64), i8(1, 3, 64), i8(1, 3, 64), num_heads=2, dequant_scale1=one, antiquant_scale=torch.ones(2))
    with pytest.raises(ValueError, match=r"antiquant_scale is required for int8 key/value"):
        ifa(t(1, 1, 64), i8(1, 3, 64), i8(1, 3, 64), num_heads=2)
    with pytest.raises(ValueError, match=r"npu_prompt_flash_attention has no antiquant"):
        pfa(t(1, 2, 64), i8(1, 3, 64), i8(1, 3, 64), num_heads=2)
    with pytest.raises(ValueError, match=r"int8 \(antiquant\) but the query has Q_S > 1"):
        fia(t(1, 2, 64), i8(1, 3, 64), i8(1, 3, 64), num_heads=2, antiquant_scale=torch.ones(2))
    with pytest.raises(ValueError, match=r"antiquant_scale is not allowed with float16 key/value"):
        ifa(t(1, 1, 64), t(1, 3, 64), t(1, 3, 64), num_heads=2, antiquant_scale=torch.ones(2))
    with pytest.raises(ValueError, match=r"quant_offset2 is not allowed without quant_scale2"):
        fia(t(1, 1, 64), t(1, 3, 64), t(1, 3, 64), num_heads=2, quant_offset2=one)
    with pytest.raises(ValueError, match=r"quant_scale2 has shape \(7,\), neither per tensor nor per channel"):
        pfa(t(1, 2, 64), t(1, 3, 64), t(1, 3, 64), num_heads=2, quant_scale2=torch.ones(7))
    with pytest.raises(ValueError, match=r"antiquant_scale has shape \(5,\)"):
        ifa(t(1, 1, 64), i8(1, 3, 64), i8(1, 3, 64), num_heads=2, antiquant_scale=torch.ones(5))


def test_dtype_and_inner_precise():
    with pytest.raises(ValueError, match=r"key/value are float32 but query is float16"):
        pfa(t(1, 2, 32), t(1, 3, 32, dtype=torch.float32), t(1, 3, 32, dtype=torch.float32), num_heads=2)
    with pytest.raises(ValueError, match=r"inner_precise is 2, out of range for this op \(Q_S = 1 allows 0/1\)"):
        fia(t(1, 1, 32), t(1, 3, 32), t(1, 3, 32), num_heads=2, inner_precise=2)
    with pytest.raises(ValueError, match=r"inner_precise is 2"):
        ifa(t(1, 1, 32), t(1, 3, 32), t(1, 3, 32), num_heads=2, inner_precise=2)


def test_ifa_query_must_be_one_token():
    with pytest.raises(ValueError, match=r"query has S = 4 .* use npu_prompt_flash_attention"):
        ifa(t(1, 4, 32), t(1, 3, 32), t(1, 3, 32), num_heads=2)


def test_mask_too_small_for_lengths():
    with pytest.raises(ValueError, match=r"atten_mask covers 1 x 3 .* but the lengths use 1 x 5"):
        ifa(t(1, 1, 32), t(1, 5, 32), t(1, 5, 32), num_heads=2, atten_mask=torch.zeros(1, 3, dtype=torch.bool))


def test_not_implemented_cases_name_the_argument():
    with pytest.raises(NotImplementedError, match=r"key_rope_antiquant_scale"):
        fia(t(1, 1, 32), t(1, 3, 32), t(1, 3, 32), num_heads=2, key_rope_antiquant_scale=torch.ones(1))
    with pytest.raises(NotImplementedError, match=r"key_antiquant_mode=2"):
        fia(t(1, 1, 64), t(1, 3, 64, dtype=torch.int8), t(1, 3, 64, dtype=torch.int8), num_heads=2,
            key_antiquant_scale=torch.ones(1), value_antiquant_scale=torch.ones(1), key_antiquant_mode=2)


def test_schema_rejects_unknown_names():
    with pytest.raises(Exception, match="scale_value"):
        fia(t(1, 1, 32), t(1, 3, 32), t(1, 3, 32), num_heads=2, scale_value=0.5)
    with pytest.raises(Exception, match="scale"):
        ifa(t(1, 1, 32), t(1, 3, 32), t(1, 3, 32), num_heads=2, scale=0.5)
