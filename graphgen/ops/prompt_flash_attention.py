"""`npu_prompt_flash_attention` (PFA): prefill attention over contiguous KV, padded (BSH, BNSD,
BSND) or varlen (TND), with sparse modes 0-4, GQA and the int8 paths (full int8 Q/K/V with
deq_scale1/quant_scale1/deq_scale2, and int8 output quantization).

The math is FIA's driver (`fused_infer_attention_score.run_infer`) in PFA's terms.
"""
from __future__ import annotations

import torch

from . import _checks as C
from ._registry import define
from .fused_infer_attention_score import InferArgs, fake_outputs, run_infer, tensor_lengths_schema

OP = "npu_prompt_flash_attention"
SCHEMA = (
    "(Tensor query, Tensor key, Tensor value, *, "
    "Tensor? padding_mask=None, Tensor? atten_mask=None, Tensor? pse_shift=None, "
    "int[]? actual_seq_lengths=None, Tensor? deq_scale1=None, Tensor? quant_scale1=None, "
    "Tensor? deq_scale2=None, Tensor? quant_scale2=None, Tensor? quant_offset2=None, "
    "int num_heads=1, float scale_value=1.0, int pre_tokens=2147483647, int next_tokens=0, "
    "str input_layout=\"BSH\", int num_key_value_heads=0, int[]? actual_seq_lengths_kv=None, "
    "int sparse_mode=0) -> Tensor"
)
define(OP, SCHEMA)
define(f"{OP}.tensor_lengths", tensor_lengths_schema(SCHEMA, ("actual_seq_lengths", "actual_seq_lengths_kv")),
       npu=False)

_DEFAULTS = dict(
    padding_mask=None, atten_mask=None, pse_shift=None, actual_seq_lengths=None, deq_scale1=None,
    quant_scale1=None, deq_scale2=None, quant_scale2=None, quant_offset2=None, num_heads=1, scale_value=1.0,
    pre_tokens=2147483647, next_tokens=0, input_layout="BSH", num_key_value_heads=0,
    actual_seq_lengths_kv=None, sparse_mode=0,
)


def _args(query, key, value, kw: dict) -> InferArgs:
    kw = C.with_defaults(OP, kw, _DEFAULTS, "use atten_mask (1 = masked) or actual_seq_lengths/actual_seq_lengths_kv")
    return InferArgs(
        op=OP, kind="pfa", query=query, key=key, value=value, layout=kw["input_layout"],
        num_heads=kw["num_heads"], num_kv_heads=kw["num_key_value_heads"], scale=kw["scale_value"],
        q_lens=kw["actual_seq_lengths"], kv_lens=kw["actual_seq_lengths_kv"], atten_mask=kw["atten_mask"],
        pse_shift=kw["pse_shift"], sparse_mode=kw["sparse_mode"], pre_tokens=kw["pre_tokens"],
        next_tokens=kw["next_tokens"], dequant_scale1=kw["deq_scale1"], quant_scale1=kw["quant_scale1"],
        dequant_scale2=kw["deq_scale2"], quant_scale2=kw["quant_scale2"], quant_offset2=kw["quant_offset2"],
        names={"q_lens": "actual_seq_lengths", "kv_lens": "actual_seq_lengths_kv",
               "dequant_scale1": "deq_scale1", "dequant_scale2": "deq_scale2"},
    )


def npu_prompt_flash_attention(query, key, value, **kw):
    """Reference kernel: output in the query's layout and dtype (int8 with quant_scale2, float16
    for int8 input without it). See npu-ops.md section 2."""
    return run_infer(_args(query, key, value, kw))[0]


def _fake(query, key, value, **kw):
    return fake_outputs(_args(query, key, value, kw))[0]


for _name in (OP, f"{OP}.tensor_lengths"):
    torch.library.impl(f"graphgen::{_name}", "CompositeExplicitAutograd")(npu_prompt_flash_attention)
    torch.library.register_fake(f"graphgen::{_name}")(_fake)
