"""`npu_incre_flash_attention` (IFA): decode attention, one query token per sequence, over a
contiguous or paged KV cache, with GQA, int8 KV antiquant and int8 output quantization.

`actual_seq_lengths` here are the KV lengths (the query has S = 1). The math is FIA's driver
(`fused_infer_attention_score.run_infer`) in IFA's terms; the checks add IFA's own limits.
"""
from __future__ import annotations

import torch

from . import _checks as C
from ._registry import define
from .fused_infer_attention_score import InferArgs, fake_outputs, run_infer, tensor_lengths_schema

OP = "npu_incre_flash_attention"
SCHEMA = (
    "(Tensor query, Tensor key, Tensor value, *, "
    "Tensor? padding_mask=None, Tensor? atten_mask=None, Tensor? pse_shift=None, "
    "SymInt[]? actual_seq_lengths=None, Tensor? antiquant_scale=None, Tensor? antiquant_offset=None, "
    "Tensor? block_table=None, Tensor? dequant_scale1=None, Tensor? quant_scale1=None, "
    "Tensor? dequant_scale2=None, Tensor? quant_scale2=None, Tensor? quant_offset2=None, "
    "Tensor? kv_padding_size=None, int num_heads=1, float scale_value=1.0, str input_layout=\"BSH\", "
    "int num_key_value_heads=0, int block_size=0, int inner_precise=1) -> Tensor"
)
define(OP, SCHEMA)
define(f"{OP}.tensor_lengths", tensor_lengths_schema(SCHEMA, ("actual_seq_lengths",)), npu=False)

_DEFAULTS = dict(
    padding_mask=None, atten_mask=None, pse_shift=None, actual_seq_lengths=None, antiquant_scale=None,
    antiquant_offset=None, block_table=None, dequant_scale1=None, quant_scale1=None, dequant_scale2=None,
    quant_scale2=None, quant_offset2=None, kv_padding_size=None, num_heads=1, scale_value=1.0,
    input_layout="BSH", num_key_value_heads=0, block_size=0, inner_precise=1,
)


def _args(query, key, value, kw: dict) -> InferArgs:
    kw = C.with_defaults(OP, kw, _DEFAULTS, "use atten_mask (1 = masked) or actual_seq_lengths")
    return InferArgs(
        op=OP, kind="ifa", query=query, key=key, value=value, layout=kw["input_layout"],
        num_heads=kw["num_heads"], num_kv_heads=kw["num_key_value_heads"], scale=kw["scale_value"],
        kv_lens=kw["actual_seq_lengths"], atten_mask=kw["atten_mask"], pse_shift=kw["pse_shift"],
        block_table=kw["block_table"], block_size=kw["block_size"], kv_padding_size=kw["kv_padding_size"],
        antiquant_scale=kw["antiquant_scale"], antiquant_offset=kw["antiquant_offset"],
        dequant_scale1=kw["dequant_scale1"], quant_scale1=kw["quant_scale1"],
        dequant_scale2=kw["dequant_scale2"], quant_scale2=kw["quant_scale2"], quant_offset2=kw["quant_offset2"],
        inner_precise=kw["inner_precise"], names={"kv_lens": "actual_seq_lengths"},
    )


def _check_decode(a: InferArgs) -> InferArgs:
    q = a.query
    C.check_layout(OP, a.layout, ("BSH", "BNSD", "BSND"))
    C.check_rank(OP, "query", q, a.layout)
    s = q.shape[2] if a.layout == "BNSD" else q.shape[1]
    if C.known_true(s != 1):
        C.fail(OP, "query", f"has S = {s} (shape {tuple(q.shape)}, input_layout={a.layout!r}); IFA decodes "
               "one token per sequence", "use npu_prompt_flash_attention or npu_fused_infer_attention_score "
               "for S > 1, or check input_layout")
    return a


def npu_incre_flash_attention(query, key, value, **kw):
    """Reference kernel: query (B, 1, H) / (B, N, 1, D) / (B, 1, N, D) -> the same shape, in the
    query's dtype (int8 with quant_scale2). See npu-ops.md section 2."""
    return run_infer(_check_decode(_args(query, key, value, kw)))[0]


def _fake(query, key, value, **kw):
    return fake_outputs(_check_decode(_args(query, key, value, kw)))[0]


for _name in (OP, f"{OP}.tensor_lengths"):
    torch.library.impl(f"graphgen::{_name}", "CompositeExplicitAutograd")(npu_incre_flash_attention)
    torch.library.register_fake(f"graphgen::{_name}")(_fake)
