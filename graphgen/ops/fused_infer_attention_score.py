"""`npu_fused_infer_attention_score` (FIA), and the inference-attention driver that IFA and PFA share.

FIA is the superset of the three inference ops (it dispatches like IFA when Q_S = 1 and like PFA
otherwise), so the driver lives here: `InferArgs` is one call in any of the three ops' terms,
`check_static` checks everything that shapes and dtypes decide (run by the fake kernels too, never
guarding on symbolic dims), `run_infer` is the reference kernel. It turns layouts, varlen, paged
KV, left padding, shared prefix, rope and antiquant into dense BNSD tensors plus lengths, and hands
the masking to `_core.visibility` and the math to `_core.attend`.

Both overloads share the one implementation: the exact schema (lengths as int lists, torch_npu's
form) and `.tensor_lengths` (lengths as 1-D int32/int64 tensors, the portable graph's form).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from . import _checks as C
from . import _layouts as L
from ._core import UNBOUNDED, attend, compute_dtype, visibility
from ._registry import define

OP = "npu_fused_infer_attention_score"
SCHEMA = (
    "(Tensor query, Tensor key, Tensor value, *, "
    "Tensor? pse_shift=None, Tensor? atten_mask=None, SymInt[]? actual_seq_lengths=None, "
    "SymInt[]? actual_seq_lengths_kv=None, Tensor? dequant_scale1=None, Tensor? quant_scale1=None, "
    "Tensor? dequant_scale2=None, Tensor? quant_scale2=None, Tensor? quant_offset2=None, "
    "Tensor? antiquant_scale=None, Tensor? antiquant_offset=None, Tensor? key_antiquant_scale=None, "
    "Tensor? key_antiquant_offset=None, Tensor? value_antiquant_scale=None, "
    "Tensor? value_antiquant_offset=None, Tensor? block_table=None, Tensor? query_padding_size=None, "
    "Tensor? kv_padding_size=None, Tensor? key_shared_prefix=None, Tensor? value_shared_prefix=None, "
    "SymInt[]? actual_shared_prefix_len=None, Tensor? query_rope=None, Tensor? key_rope=None, "
    "Tensor? key_rope_antiquant_scale=None, int num_heads=1, float scale=1.0, "
    "int pre_tokens=2147483647, int next_tokens=2147483647, str input_layout=\"BSH\", "
    "int num_key_value_heads=0, int sparse_mode=0, int inner_precise=0, int block_size=0, "
    "int antiquant_mode=0, int key_antiquant_mode=0, int value_antiquant_mode=0, "
    "bool softmax_lse_flag=False) -> (Tensor attention_out, Tensor softmax_lse)"
)


def tensor_lengths_schema(schema: str, names: tuple[str, ...]) -> str:
    """The graph-only overload's schema: the same, with the named int-list lengths as `Tensor?`."""
    for name in names:
        for kind in ("SymInt[]?", "int[]?"):
            schema = schema.replace(f"{kind} {name}=None", f"Tensor? {name}=None")
    return schema


TENSOR_LENGTHS = ("actual_seq_lengths", "actual_seq_lengths_kv", "actual_shared_prefix_len")
define(OP, SCHEMA)
define(f"{OP}.tensor_lengths", tensor_lengths_schema(SCHEMA, TENSOR_LENGTHS), npu=False)

COMPRESSED_MASK = 2048
MODE_OPTIONS = (0, 1)  # antiquant modes: 0 per-channel (incl. per-tensor), 1 per-token


@dataclass
class InferArgs:
    """One call of IFA, PFA or FIA, in FIA's terms. `names` maps a role to the op's own argument
    name (e.g. dequant_scale1 -> "deq_scale1" for PFA) so errors name what the caller passed."""

    op: str
    kind: str  # "ifa" | "pfa" | "fia"
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    layout: str = "BSH"
    num_heads: int = 1
    num_kv_heads: int = 0
    scale: float = 1.0
    q_lens: Any = None
    kv_lens: Any = None
    atten_mask: torch.Tensor | None = None
    pse_shift: torch.Tensor | None = None
    sparse_mode: int = 0
    pre_tokens: int = UNBOUNDED
    next_tokens: int = UNBOUNDED
    block_table: torch.Tensor | None = None
    block_size: int = 0
    kv_padding_size: torch.Tensor | None = None
    query_padding_size: torch.Tensor | None = None
    antiquant_scale: torch.Tensor | None = None
    antiquant_offset: torch.Tensor | None = None
    antiquant_mode: int = 0
    key_antiquant_scale: torch.Tensor | None = None
    key_antiquant_offset: torch.Tensor | None = None
    key_antiquant_mode: int = 0
    value_antiquant_scale: torch.Tensor | None = None
    value_antiquant_offset: torch.Tensor | None = None
    value_antiquant_mode: int = 0
    dequant_scale1: torch.Tensor | None = None
    quant_scale1: torch.Tensor | None = None
    dequant_scale2: torch.Tensor | None = None
    quant_scale2: torch.Tensor | None = None
    quant_offset2: torch.Tensor | None = None
    key_shared_prefix: torch.Tensor | None = None
    value_shared_prefix: torch.Tensor | None = None
    shared_prefix_len: Any = None
    query_rope: torch.Tensor | None = None
    key_rope: torch.Tensor | None = None
    inner_precise: int = 0
    softmax_lse_flag: bool = False
    names: dict = field(default_factory=dict)

    def name(self, role: str) -> str:
        return self.names.get(role, role)


@dataclass
class Dims:
    heads: Any
    kv_heads: Any
    head_dim: Any
    q_seq: Any  # None for TND
    paged: bool
    decode: bool  # IFA-like (Q_S = 1 known)
    int8_all: bool
    int8_kv: bool
    out_dtype: torch.dtype


def _dt(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def _present(a: InferArgs, *roles: str) -> list[str]:
    return [a.name(r) for r in roles if getattr(a, r) is not None]


def check_static(a: InferArgs) -> Dims:
    """Every check that shapes, dtypes and attributes decide (fake and real kernels)."""
    op, layout, q, k, v = a.op, a.layout, a.query, a.key, a.value
    C.check_layout(op, layout, ("BSH", "BNSD", "BSND") if a.kind == "ifa" else ("BSH", "BNSD", "BSND", "TND"))
    C.check_rank(op, "query", q, layout)
    if layout == "BSH":
        if a.num_heads <= 0:
            C.fail(op, "num_heads", f"is {a.num_heads}", "pass the number of query heads (BSH splits hidden by it)")
        C.check_bsh_hidden(op, "query", q.shape[-1], a.num_heads)
        n, d = a.num_heads, q.shape[-1] // a.num_heads
    else:
        n, d = (q.shape[2] if layout == "BSND" else q.shape[1]), q.shape[-1]
    q_seq = None if layout == "TND" else (q.shape[2] if layout == "BNSD" else q.shape[1])
    nkv_arg = a.num_kv_heads if a.num_kv_heads > 0 else n
    if a.num_kv_heads < 0:
        C.fail(op, "num_key_value_heads", f"is {a.num_kv_heads}", "pass 0 (= num_heads) or a positive count")

    paged = a.block_table is not None
    if paged:
        C.check_block_table(op, a.block_table)
        cache_form = "(num_blocks, num_key_value_heads, block_size, head_dim)" if layout == "BNSD" else \
            "(num_blocks, block_size, num_key_value_heads*head_dim)"
        for name, t in (("key", k), ("value", v)):
            if t.dim() != (4 if layout == "BNSD" else 3):
                C.fail(op, name, f"is the paged KV cache (block_table given) with shape {tuple(t.shape)}",
                       f"for input_layout={layout!r} pass a cache of shape {cache_form}")
        if layout == "BNSD":
            nkv, dk, cache_bs = k.shape[1], k.shape[3], k.shape[2]
        else:
            C.check_bsh_hidden(op, "key cache", k.shape[-1], nkv_arg, "num_key_value_heads")
            nkv, dk, cache_bs = nkv_arg, k.shape[-1] // nkv_arg, k.shape[1]
        if a.block_size <= 0:
            C.fail(op, "block_size", f"is {a.block_size} with block_table given",
                   f"pass block_size={cache_bs} (the cache's block dimension)")
        if C.known_true(cache_bs != a.block_size):
            C.fail(op, "block_size", f"({a.block_size}) differs from the KV cache's block dimension ({cache_bs})",
                   f"pass block_size={cache_bs} or a cache of shape {cache_form}")
        align = 32 if k.dtype == torch.int8 else 16
        if a.block_size % align:
            C.fail(op, "block_size", f"is {a.block_size}, not a multiple of {align}",
                   f"use a KV block size that is a multiple of {align} (e.g. 16, 32, 128)")
        if layout != "TND" and C.known_true(a.block_table.shape[0] != q.shape[0]):
            C.fail(op, "block_table", f"has {a.block_table.shape[0]} rows but query has batch {q.shape[0]}",
                   "pass one block-table row per sequence")
    else:
        if a.block_size != 0:
            C.fail(op, "block_size", f"is {a.block_size} but no block_table was given",
                   "pass block_table (paged KV) or leave block_size=0")
        C.check_rank(op, "key", k, layout)
        C.check_rank(op, "value", v, layout)
        if layout == "BSH":
            C.check_bsh_hidden(op, "key", k.shape[-1], nkv_arg, "num_key_value_heads")
            nkv, dk = nkv_arg, k.shape[-1] // nkv_arg
        else:
            nkv, dk = (k.shape[2] if layout == "BSND" else k.shape[1]), k.shape[-1]
        if layout != "TND" and C.known_true(k.shape[0] != q.shape[0]):
            C.fail(op, "key", f"has batch {k.shape[0]} but query has batch {q.shape[0]}",
                   "pass key/value with the query's batch size")
    hidden_kv = layout == "BSH" if not paged else layout != "BNSD"  # (.., Nkv*D) forms
    for name, got in (("key", dk), ("value", v.shape[-1] // nkv if hidden_kv else v.shape[-1])):
        if C.known_true(got != d):
            C.fail(op, name, f"has head_dim {got} but query has head_dim {d}",
                   "pass query/key/value with one head_dim (check num_heads/num_key_value_heads for BSH)")
    if k.dim() != v.dim() or any(C.known_true(x != y) for x, y in zip(k.shape, v.shape)):
        C.fail(op, "value", f"has shape {tuple(v.shape)} but key has {tuple(k.shape)}", "pass key and value of one shape")
    C.check_heads(op, n, nkv)

    # dtypes and the quantization combinations
    qd, kd = q.dtype, k.dtype
    C.check_same_dtype(op, ("key", "value"), (k, v))
    decode = a.kind == "ifa" or (a.kind == "fia" and q_seq is not None and C.known_true(q_seq == 1))
    int8_all = qd == torch.int8
    int8_kv = kd == torch.int8 and not int8_all
    deq = ("dequant_scale1", "quant_scale1", "dequant_scale2")
    antiq = ("antiquant_scale", "antiquant_offset", "key_antiquant_scale", "key_antiquant_offset",
             "value_antiquant_scale", "value_antiquant_offset")
    if int8_all:
        if kd != torch.int8:
            C.fail(op, "key/value", f"are {_dt(kd)} with an int8 query",
                   "pass int8 key/value too (full int8 path) or a float16/bfloat16 query")
        if decode:
            C.fail(op, "query/key/value", "are all int8, which the incremental (Q_S = 1) kernel forbids",
                   "pass a float16/bfloat16 query with int8 key/value and antiquant_scale")
        for role in deq:
            C.require(op, a.name(role), getattr(a, role) is not None, "for int8 query/key/value",
                      f"pass {', '.join(a.name(r) for r in deq)} (all per tensor)")
        if a.quant_scale2 is None:
            C.forbid(op, a.name("quant_offset2"), a.quant_offset2 is not None,
                     "without quant_scale2 (int8 in, float16 out)")
        C.forbid(op, ", ".join(_present(a, *antiq)), bool(_present(a, *antiq)), "with an int8 query",
                 "drop the antiquant arguments (the full int8 path uses dequant_scale1/2)")
    elif qd in C.FLOAT_DTYPES:
        bad = _present(a, *deq)
        C.forbid(op, ", ".join(bad), bool(bad), f"with a {_dt(qd)} query (they belong to the int8 query path)",
                 "drop them, or pass int8 query/key/value")
        if kd == torch.int8:
            if a.kind == "pfa":
                C.fail(op, "key/value", f"are int8 with a {_dt(qd)} query: npu_prompt_flash_attention has no "
                       "antiquant", "use npu_incre_flash_attention / npu_fused_infer_attention_score (Q_S = 1) "
                       "for int8 KV, or an int8 query with deq_scale1/quant_scale1/deq_scale2")
            if a.kind == "fia" and not decode:
                C.fail(op, "key/value", "are int8 (antiquant) but the query has Q_S > 1",
                       "int8 KV works only for decode (Q_S = 1); dequantize the KV for prefill")
            has_pair = a.key_antiquant_scale is not None or a.value_antiquant_scale is not None
            if has_pair:
                C.require(op, "key_antiquant_scale", a.key_antiquant_scale is not None,
                          "when value_antiquant_scale is given")
                C.require(op, "value_antiquant_scale", a.value_antiquant_scale is not None,
                          "when key_antiquant_scale is given")
            C.require(op, "antiquant_scale", a.antiquant_scale is not None or has_pair,
                      "for int8 key/value with a float query",
                      "pass antiquant_scale (row 0 for key, row 1 for value); dequantized = (x + offset) * scale")
        elif kd in C.FLOAT_DTYPES:
            if kd != qd:
                C.fail(op, "key/value", f"are {_dt(kd)} but query is {_dt(qd)}", "pass query/key/value in one dtype")
            bad = _present(a, *antiq)
            C.forbid(op, ", ".join(bad), bool(bad), f"with {_dt(kd)} key/value (antiquant is for int8 KV)")
        else:
            C.check_dtype(op, "key", k, (qd, torch.int8))
    else:
        C.check_dtype(op, "query", q, (torch.float16, torch.bfloat16, torch.float32, torch.int8))
    if a.quant_scale2 is None:
        C.forbid(op, "quant_offset2", a.quant_offset2 is not None, "without quant_scale2",
                 "pass quant_scale2 too (int8 output) or drop quant_offset2")
    for role in ("antiquant_mode", "key_antiquant_mode", "value_antiquant_mode"):
        mode = getattr(a, role)
        if mode in (2, 3, 4, 5) and role != "antiquant_mode":
            C.unsupported(op, f"{role}={mode}", "(per-head / paged scale forms)")
        C.check_choice(op, role, mode, MODE_OPTIONS)
    per_token = (a.antiquant_mode == 1 and a.antiquant_scale is not None and a.key_antiquant_scale is None) or \
        (a.key_antiquant_scale is not None and 1 in (a.key_antiquant_mode, a.value_antiquant_mode))
    C.check_head_dim(op, d, int8=kd == torch.int8)

    # masks and modes
    if a.kind != "ifa":
        C.check_choice(op, "sparse_mode", a.sparse_mode, range(5), " (0-4 for the inference ops)")
    mask = a.atten_mask
    if mask is not None:
        C.check_mask_dtype(op, mask)
        if a.kind != "ifa" and a.sparse_mode in (2, 3, 4):
            full = (COMPRESSED_MASK, COMPRESSED_MASK)
            if mask.dim() < 2 or tuple(mask.shape[-2:]) != full or any(s != 1 for s in mask.shape[:-2]) \
                    or mask.dim() > 4:
                C.fail(op, "atten_mask", f"has shape {tuple(mask.shape)} with sparse_mode={a.sparse_mode}, which "
                       "takes the compressed mask", "pass torch.triu(torch.ones(2048, 2048, dtype=torch.bool), "
                       "diagonal=1) (or (1, 2048, 2048) / (1, 1, 2048, 2048)); the kernel derives the real mask")
        elif mask.dim() not in (2, 3, 4):
            shapes = "(B, S_kv), (B, 1, S_kv) or (B, 1, 1, S_kv)" if decode else \
                "(S_q, S_kv), (B, S_q, S_kv) or (B, 1, S_q, S_kv)"
            C.fail(op, "atten_mask", f"has shape {tuple(mask.shape)}", f"pass a mask of shape {shapes}")
    elif a.kind != "ifa" and a.sparse_mode == 1:
        C.fail(op, "atten_mask", "is required with sparse_mode=1 (allMask)",
               "pass the full (S_q, S_kv) / (B, 1, S_q, S_kv) mask, or use sparse_mode=0")
    if a.pse_shift is not None and a.pse_shift.dim() != 4:
        C.fail(op, "pse_shift", f"has shape {tuple(a.pse_shift.shape)}",
               "pass (B, N, S_q, S_kv) or (1, N, S_q, S_kv) (S_q = 1 for decode)")
    precise = (0, 1) if decode else (0, 1, 2, 3)
    C.check_choice(op, "inner_precise", a.inner_precise, precise, " (Q_S = 1 allows 0/1)" if decode else "")

    # lengths, paging, padding, prefix, rope
    q_len, kv_len = a.name("q_lens"), a.name("kv_lens")
    if paged:
        C.require(op, kv_len, a.kv_lens is not None, "with block_table (paged attention)",
                  f"pass {kv_len} = the KV length of every sequence")
    if layout == "TND":
        C.require(op, q_len, a.q_lens is not None, "for input_layout='TND'",
                  f"pass {q_len} as cumulative ends without a leading 0 (lengths 2,2,2 -> [2, 4, 6])")
        C.require(op, kv_len, a.kv_lens is not None, "for input_layout='TND'",
                  f"pass {kv_len} (cumulative ends; per-sequence lengths with block_table)")
    if a.kv_padding_size is not None:
        C.forbid(op, "kv_padding_size", paged, "with block_table (paged KV has no left padding)")
        C.require(op, kv_len, a.kv_lens is not None, "with kv_padding_size")
        C.forbid(op, "kv_padding_size", layout == "TND", "with input_layout='TND'")
    if a.query_padding_size is not None:
        C.require(op, q_len, a.q_lens is not None, "with query_padding_size")
        C.forbid(op, "query_padding_size", layout == "TND", "with input_layout='TND'")
    has_prefix = a.key_shared_prefix is not None or a.value_shared_prefix is not None
    if has_prefix:
        C.require(op, "key_shared_prefix", a.key_shared_prefix is not None, "when value_shared_prefix is given")
        C.require(op, "value_shared_prefix", a.value_shared_prefix is not None, "when key_shared_prefix is given")
        if layout == "TND":
            C.unsupported(op, "key_shared_prefix", "with input_layout='TND'")
        if per_token:
            C.unsupported(op, "key_shared_prefix", "with per-token antiquant")
        if a.query_rope is not None:
            C.unsupported(op, "key_shared_prefix", "with query_rope/key_rope")
        C.check_rank(op, "key_shared_prefix", a.key_shared_prefix, layout)
    else:
        C.forbid(op, "actual_shared_prefix_len", a.shared_prefix_len is not None, "without key_shared_prefix")
    if (a.query_rope is None) != (a.key_rope is None):
        C.fail(op, "query_rope/key_rope", "must be given together", "pass both or neither")
    if a.query_rope is not None and int8_all:
        C.unsupported(op, "query_rope", "with the full int8 path")

    if int8_all:
        out_dtype = torch.int8 if a.quant_scale2 is not None else torch.float16
    else:
        out_dtype = torch.int8 if a.quant_scale2 is not None else qd
    return Dims(n, nkv, d, q_seq, paged, decode, int8_all, int8_kv, out_dtype)


def fake_outputs(a: InferArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Output shapes only: attention_out like query (int8 / float16 by the quant path) and the lse
    ((B, N, S, 1), (T, N, 1) for TND, or a (1,) placeholder). Never reads length values."""
    dims = check_static(a)
    q = a.query
    out = q.new_empty(q.shape, dtype=dims.out_dtype)
    if not a.softmax_lse_flag:
        return out, q.new_empty((1,), dtype=torch.float32)
    if a.layout == "TND":
        return out, q.new_empty((q.shape[0], dims.heads, 1), dtype=torch.float32)
    return out, q.new_empty((q.shape[0], dims.heads, dims.q_seq, 1), dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# The reference kernel


def _lengths(op: str, name: str, x: Any, device: torch.device) -> torch.Tensor | None:
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        if x.dim() != 1 or x.dtype not in (torch.int32, torch.int64):
            C.fail(op, name, f"is a tensor of shape {tuple(x.shape)} and dtype {_dt(x.dtype)}",
                   "pass a 1-D int32/int64 tensor (one entry per sequence)")
        return x.to(device=device, dtype=torch.int64)
    return torch.tensor([int(i) for i in x], dtype=torch.int64, device=device)


def _per_batch(op: str, name: str, lens: torch.Tensor, batch: int, limit: int, what: str) -> torch.Tensor:
    if lens.numel() == 1 and batch != 1:
        lens = lens.expand(batch)
    if lens.numel() != batch:
        C.fail(op, name, f"has {lens.numel()} entries for batch {batch}", "pass one length per sequence (or one for all)")
    if bool((lens < 0).any()) or bool((lens > limit).any()):
        C.fail(op, name, f"{lens.tolist()} is outside [0, {limit}] ({what})", f"pass lengths of at most {limit}")
    return lens


def _ends(op: str, name: str, ends: torch.Tensor, total: int) -> torch.Tensor:
    if ends.numel() == 0 or bool((L.starts_from_ends(ends) > ends).any()) or int(ends[-1]) > total:
        C.fail(op, name, f"{ends.tolist()} are not cumulative ends within {total} tokens for TND",
               "pass cumulative ends without a leading 0 (lengths 2,2,2 -> [2, 4, 6]), the last at most T")
    return ends


def _padding(op: str, name: str, pad: torch.Tensor) -> int:
    if pad.numel() != 1 or pad.dtype.is_floating_point:
        C.fail(op, name, f"has shape {tuple(pad.shape)} / dtype {_dt(pad.dtype)}", "pass one int64 value, shape (1,)")
    value = int(pad.reshape(-1)[0])
    if value < 0:
        C.fail(op, name, f"is {value}", "pass a non-negative left padding")
    return value


def _antiquant_params(a: InferArgs, dims: Dims, batch: int, seq: int):
    """((key_scale, key_offset), (value_scale, value_offset)), each broadcastable to (B, Nkv, S, D)."""
    nkv, d = dims.kv_heads, dims.head_dim

    def norm(t, mode, name, row=None):
        if t is None:
            return None
        if row is not None:
            if t.shape[0] != 2:
                C.fail(a.op, name, f"has shape {tuple(t.shape)}", "pass row 0 for key and row 1 for value: (2, ...)")
            t = t[row]
        if mode == 1:
            if t.numel() % batch:
                C.fail(a.op, name, f"has shape {tuple(t.shape)} with per-token mode",
                       "pass (2, B, S_kv) (antiquant_scale) or (B, S_kv) (key_/value_antiquant_scale)")
            return L.per_token(t, batch, seq)
        if t.numel() not in (1, nkv * d):
            C.fail(a.op, name, f"has shape {tuple(t.shape)}, neither per tensor nor per channel",
                   f"pass (2,) per tensor or per channel (2, H) BSH / (2, Nkv, 1, D) BNSD / (2, Nkv, D) BSND "
                   f"with H = {nkv * d}")
        return L.per_channel(t, nkv, d)

    if a.key_antiquant_scale is not None:  # the separate forms win over antiquant_scale
        return ((norm(a.key_antiquant_scale, a.key_antiquant_mode, "key_antiquant_scale"),
                 norm(a.key_antiquant_offset, a.key_antiquant_mode, "key_antiquant_offset")),
                (norm(a.value_antiquant_scale, a.value_antiquant_mode, "value_antiquant_scale"),
                 norm(a.value_antiquant_offset, a.value_antiquant_mode, "value_antiquant_offset")))
    return tuple((norm(a.antiquant_scale, a.antiquant_mode, "antiquant_scale", r),
                  norm(a.antiquant_offset, a.antiquant_mode, "antiquant_offset", r)) for r in (0, 1))


def _output_param(a: InferArgs, dims: Dims, t: torch.Tensor | None, name: str) -> torch.Tensor | None:
    if t is None:
        return None
    if t.numel() not in (1, dims.heads * dims.head_dim):
        C.fail(a.op, name, f"has shape {tuple(t.shape)}, neither per tensor nor per channel",
               f"pass (1,) or per channel (H,) / (1, 1, H) BSH, (N, D) / (1, N, 1, D) BNSD, (N, D) / (1, 1, N, D) "
               f"BSND with N*D = {dims.heads * dims.head_dim}")
    return L.per_channel(t, dims.heads, dims.head_dim)


def _scalar(t: torch.Tensor, name: str, op: str) -> float:
    if t.numel() != 1:
        C.fail(op, name, f"has shape {tuple(t.shape)}", "pass one value (per tensor), shape (1,)")
    return float(L.decode_quant_param(t).reshape(-1)[0])


def _mask_layout(m: torch.Tensor, decode_2d: bool) -> torch.Tensor:
    """atten_mask / pse_shift -> 4-D (Bm, Hm, R, C)."""
    if m.dim() == 2:
        return m[:, None, None, :] if decode_2d else m[None, None]
    if m.dim() == 3:
        return m[:, None]
    return m


def _to_logical(op: str, name: str, m: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                need_rows: int, need_cols: int, batch: int) -> torch.Tensor:
    """Gather mask/pse rows and columns from physical to logical positions."""
    if m.shape[0] not in (1, batch):
        C.fail(op, name, f"has batch {m.shape[0]} for batch {batch}", "pass batch 1 or the query's batch")
    if m.shape[2] < need_rows or m.shape[3] < need_cols:
        C.fail(op, name, f"covers {m.shape[2]} x {m.shape[3]} (query x key) positions but the lengths use "
               f"{need_rows} x {need_cols}", "pass a mask at least as large as the (padded) query and KV")
    m = L.take(m, rows.clamp(max=m.shape[2] - 1), 2)
    return L.take(m, cols.clamp(max=m.shape[3] - 1), 3)


def _plain_paged_decode(a: InferArgs, dims: Dims) -> bool:
    """The serving decode call: one float query token per sequence over a float paged cache, the
    KV lengths alone deciding what is visible (no mask, pse, quant, padding, prefix, rope, lse)."""
    return (dims.paged and dims.decode and a.layout != "TND" and not dims.int8_all and not dims.int8_kv
            and a.q_lens is None and a.atten_mask is None and a.pse_shift is None
            and a.query_padding_size is None and a.kv_padding_size is None and a.key_shared_prefix is None
            and a.query_rope is None and a.quant_scale2 is None and not a.softmax_lse_flag
            and (a.kind == "ifa" or a.sparse_mode in (0, 3)))


def _paged_decode(a: InferArgs, dims: Dims, kv_lens_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """run_infer for `_plain_paged_decode` calls: gathers only the blocks the longest sequence uses
    (not the whole block table) and attends without the general visibility/padding machinery.
    Same math as `_core.attend` (compute dtype, -inf masking, softmax over the visible keys).
    None when a row has no visible key (the general path zeroes those rows)."""
    q, bs = a.query, a.block_size
    b, n, nkv, d = q.shape[0], dims.heads, dims.kv_heads, dims.head_dim
    max_blocks = a.block_table.shape[1]
    kv_lens = _per_batch(a.op, a.name("kv_lens"), kv_lens_in, b, max_blocks * bs,
                         f"block_table holds {max_blocks} blocks of {bs} tokens per sequence; pass a wider "
                         "block_table (its second dim must cover the longest sequence)")
    lo, hi = (int(x) for x in torch.aminmax(kv_lens))
    if lo <= 0:
        return None
    used = -(-hi // bs)
    bt = a.block_table[:, :used].to(torch.int64)
    if used < max_blocks or lo < hi:  # entries past a row's own length may hold anything
        needed = torch.arange(used, device=bt.device).view(1, -1) < ((kv_lens + bs - 1) // bs).view(-1, 1)
        bt = torch.where(needed, bt, torch.zeros_like(bt))
    num_blocks = a.key.shape[0]
    if bool(((bt < 0) | (bt >= num_blocks)).any()):
        C.fail(a.op, "block_table", f"has entries outside [0, {num_blocks}) in the blocks the lengths use",
               f"pass block ids of the cache (it has {num_blocks} blocks)")
    ct = compute_dtype(q)
    k = L.gather_paged(a.key, bt, nkv).to(ct)  # (B, Nkv, S, D)
    v = L.gather_paged(a.value, bt, nkv).to(ct)
    qg = L.to_bnsd(q, a.layout, n).to(ct).reshape(b, nkv, n // nkv, d)  # (B, Nkv, G, D)
    logits = torch.matmul(qg, k.transpose(-1, -2)) * a.scale  # (B, Nkv, G, S)
    if lo < k.shape[2]:
        hidden = torch.arange(k.shape[2], device=q.device).view(1, 1, 1, -1) >= kv_lens.view(-1, 1, 1, 1)
        logits = logits.masked_fill(hidden, float("-inf"))
    out = torch.matmul(torch.softmax(logits, dim=-1), v).reshape(b, n, 1, d)
    return L.from_bnsd(out.to(dims.out_dtype), a.layout), torch.zeros(1, dtype=torch.float32, device=q.device)


def run_infer(a: InferArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference kernel: (attention_out in the query's layout, lse fp32 or a (1,) zero tensor)."""
    dims = check_static(a)
    op, layout, q = a.op, a.layout, a.query
    dev = q.device
    n, nkv = dims.heads, dims.kv_heads
    if layout != "BSH" and a.num_heads not in (n, 1):  # the tensor's head dim is authoritative
        warnings.warn(f"{op}: num_heads={a.num_heads} but the {layout} query has {n} heads; using {n}", stacklevel=3)
    if _plain_paged_decode(a, dims) and q.shape[0] > 0:
        fast = _paged_decode(a, dims, _lengths(op, a.name("kv_lens"), a.kv_lens, dev))
        if fast is not None:
            return fast
    q_lens_in = _lengths(op, a.name("q_lens"), a.q_lens, dev)
    kv_lens_in = _lengths(op, a.name("kv_lens"), a.kv_lens, dev)

    # queries -> (B, N, Sq, D) physical, with lengths and left-padding starts
    if layout == "TND":
        q_ends = _ends(op, a.name("q_lens"), q_lens_in, q.shape[0])
        batch = q_ends.numel()
        q_lens = q_ends - L.starts_from_ends(q_ends)
        sq = max(int(q_lens.max()), 1)
        qp = L.tnd_to_padded(q, q_ends, sq)
    else:
        batch = q.shape[0]
        qp = L.to_bnsd(q, layout, n)
        sq = qp.shape[2]
        q_pad = _padding(op, "query_padding_size", a.query_padding_size) if a.query_padding_size is not None else 0
        q_lens = torch.full((batch,), sq, dtype=torch.int64, device=dev) if q_lens_in is None else \
            _per_batch(op, a.name("q_lens"), q_lens_in, batch, sq - q_pad, "the query's S minus query_padding_size")
    q_start = (sq - q_pad - q_lens) if layout != "TND" and a.query_padding_size is not None else torch.zeros_like(q_lens)

    # key/value -> (B, Nkv, Skv, D) physical
    if dims.paged:
        bt = a.block_table.to(torch.int64)
        bs, max_blocks = a.block_size, bt.shape[1]
        kv_lens = _per_batch(op, a.name("kv_lens"), kv_lens_in, batch, max_blocks * bs,
                             f"block_table holds {max_blocks} blocks of {bs} tokens per sequence; pass a wider "
                             "block_table (its second dim must cover the longest sequence)")
        needed = torch.arange(max_blocks, device=dev).view(1, -1) < ((kv_lens + bs - 1) // bs).view(-1, 1)
        num_blocks = a.key.shape[0]
        used = bt[needed]
        if bool(((used < 0) | (used >= num_blocks)).any()):
            C.fail(op, "block_table", f"has entries outside [0, {num_blocks}) in the blocks the lengths use",
                   f"pass block ids of the cache (it has {num_blocks} blocks)")
        bt = torch.where(needed, bt, torch.zeros_like(bt))  # unused slots may hold anything

        def kv(t):
            return L.gather_paged(t, bt, nkv)
    elif layout == "TND":
        kv_ends = _ends(op, a.name("kv_lens"), kv_lens_in, a.key.shape[0])
        if kv_ends.numel() != batch:
            C.fail(op, a.name("kv_lens"), f"has {kv_ends.numel()} entries but {a.name('q_lens')} has {batch}",
                   "pass one cumulative end per sequence in both")
        kv_lens = kv_ends - L.starts_from_ends(kv_ends)
        skv_max = max(int(kv_lens.max()), 1)

        def kv(t):
            return L.tnd_to_padded(t, kv_ends, skv_max)
    else:
        def kv(t):
            return L.to_bnsd(t, layout, nkv)
    kp, vp = kv(a.key), kv(a.value)
    skv = kp.shape[2]
    kv_pad = _padding(op, "kv_padding_size", a.kv_padding_size) if a.kv_padding_size is not None else 0
    if not dims.paged and layout != "TND":
        kv_lens = torch.full((batch,), skv, dtype=torch.int64, device=dev) if kv_lens_in is None else \
            _per_batch(op, a.name("kv_lens"), kv_lens_in, batch, skv - kv_pad, "the KV's S minus kv_padding_size")
    kv_start = (skv - kv_pad - kv_lens) if a.kv_padding_size is not None else torch.zeros_like(kv_lens)

    # int8 KV -> fp32
    (ks, ko), (vs, vo) = (None, None), (None, None)
    if dims.int8_kv:
        (ks, ko), (vs, vo) = _antiquant_params(a, dims, batch, skv)
        kp, vp = L.antiquant(kp, ks, ko), L.antiquant(vp, vs, vo)

    # rope: concatenated to the head dim of query and key
    if a.query_rope is not None:
        qr = L.tnd_to_padded(a.query_rope, q_ends, sq) if layout == "TND" else L.to_bnsd(a.query_rope, layout, n)
        qp = torch.cat([qp, qr.to(qp.dtype)], dim=-1)
        kp = torch.cat([kp, kv(a.key_rope).to(kp.dtype)], dim=-1)

    # shared prefix and left padding: gather KV to logical positions [prefix | valid kv]
    prefix = 0
    if a.key_shared_prefix is not None:
        kpre = L.to_bnsd(a.key_shared_prefix, layout, nkv)
        vpre = L.to_bnsd(a.value_shared_prefix, layout, nkv)
        if kpre.shape[0] != 1 or kpre.shape[1] != nkv or kpre.shape[-1] != kp.shape[-1] or kpre.shape != vpre.shape:
            C.fail(op, "key_shared_prefix", f"has shape {tuple(a.key_shared_prefix.shape)}",
                   f"pass batch 1 with the key's heads and head_dim in the {layout} layout (value_shared_prefix alike)")
        s_pre = kpre.shape[2]
        plen = _lengths(op, "actual_shared_prefix_len", a.shared_prefix_len, dev)
        prefix = s_pre if plen is None else int(plen.reshape(-1)[0])
        if not 0 <= prefix <= s_pre:
            C.fail(op, "actual_shared_prefix_len", f"is {prefix} for a prefix of {s_pre} tokens",
                   f"pass a length in [0, {s_pre}]")
        if dims.int8_kv:  # per-channel / per-tensor only (per-token with a prefix is rejected)
            kpre, vpre = L.antiquant(kpre, ks, ko), L.antiquant(vpre, vs, vo)
        kp = torch.cat([kpre.to(kp.dtype).expand(batch, -1, -1, -1), kp], dim=2)
        vp = torch.cat([vpre.to(vp.dtype).expand(batch, -1, -1, -1), vp], dim=2)
    else:
        s_pre = 0
    width = prefix + skv
    j = torch.arange(width, device=dev).view(1, -1)
    kv_cols = torch.where(j < prefix, j, kv_start.view(-1, 1) + j)  # mask/pse columns (no gap after prefix)
    if prefix or s_pre or a.kv_padding_size is not None:
        src = torch.where(j < prefix, j, s_pre + kv_start.view(-1, 1) + j - prefix).clamp(0, kp.shape[2] - 1)
        kp, vp = L.take(kp, src, 2), L.take(vp, src, 2)
    kv_lens_logical = kv_lens + prefix
    q_rows = L.window_index(q_start, sq, sq)
    if a.query_padding_size is not None:
        qp = L.take(qp, q_rows, 2)

    # masks: sparse_mode -> visibility; atten_mask / pse_shift gathered to logical positions
    need_rows = int((q_start + q_lens).max())
    last_col = kv_cols.gather(1, (kv_lens_logical - 1).clamp(min=0).view(-1, 1)).view(-1) + 1
    need_cols = int(torch.where(kv_lens_logical > 0, last_col, torch.zeros_like(last_col)).max())
    decode_2d = dims.decode and layout != "TND"
    mode = 0 if a.kind == "ifa" else a.sparse_mode
    masked = None
    if a.atten_mask is not None and mode in (0, 1):
        m = a.atten_mask if a.atten_mask.dtype == torch.bool else a.atten_mask != 0
        masked = _to_logical(op, "atten_mask", _mask_layout(m, decode_2d), q_rows, kv_cols,
                             need_rows, need_cols, batch)
    bias = None
    if a.pse_shift is not None:
        bias = _to_logical(op, "pse_shift", a.pse_shift, q_rows, kv_cols, need_rows, need_cols, batch)
    causal = band = None
    pre = nxt = UNBOUNDED
    if mode == 0 and masked is not None and a.kind != "ifa":
        band, pre, nxt = "top_left", a.pre_tokens, a.next_tokens
    elif mode == 2:
        causal = "top_left"
    elif mode == 3:
        causal = "bottom_right"
    elif mode == 4:
        band, pre, nxt = "bottom_right", a.pre_tokens, a.next_tokens
    visible = visibility(sq, width, q_lens=q_lens, kv_lens=kv_lens_logical, causal=causal,
                         pre_tokens=pre, next_tokens=nxt, band=band, masked=masked)

    # attention, then the int8 path's rescale / output quantization
    scale, quantize_probs = a.scale, None
    if dims.int8_all:
        scale = scale * _scalar(a.dequant_scale1, a.name("dequant_scale1"), op)
        quantize_probs = _scalar(a.quant_scale1, a.name("quant_scale1"), op)
    res = attend(qp, kp, vp, scale=scale, visible=visible, bias=bias, quantize_probs=quantize_probs)
    out = res.out[..., : dims.head_dim]
    if dims.int8_all:
        out = out * _scalar(a.dequant_scale2, a.name("dequant_scale2"), op)
    if a.quant_scale2 is not None:
        out = L.quantize_int8(out, _output_param(a, dims, a.quant_scale2, "quant_scale2"),
                              _output_param(a, dims, a.quant_offset2, "quant_offset2"))
    else:
        out = out.to(dims.out_dtype)
    out = L.scatter_rows(out, q_start, q_lens, sq)  # zero rows beyond the lengths, undo query padding
    out = L.padded_to_tnd(out, q_ends, q.shape[0]) if layout == "TND" else L.from_bnsd(out, layout)

    if not a.softmax_lse_flag:
        return out, torch.zeros(1, dtype=torch.float32, device=dev)
    lse = L.scatter_rows(res.lse.to(torch.float32).unsqueeze(-1), q_start, q_lens, sq)
    lse = L.padded_to_tnd(lse, q_ends, q.shape[0]) if layout == "TND" else lse
    return out, lse


# ----------------------------------------------------------------------------------------------
# The op


def _fia_args(query, key, value, kw: dict) -> InferArgs:
    return InferArgs(
        op=OP, kind="fia", query=query, key=key, value=value,
        layout=kw["input_layout"], num_heads=kw["num_heads"], num_kv_heads=kw["num_key_value_heads"],
        scale=kw["scale"], q_lens=kw["actual_seq_lengths"], kv_lens=kw["actual_seq_lengths_kv"],
        atten_mask=kw["atten_mask"], pse_shift=kw["pse_shift"], sparse_mode=kw["sparse_mode"],
        pre_tokens=kw["pre_tokens"], next_tokens=kw["next_tokens"], block_table=kw["block_table"],
        block_size=kw["block_size"], kv_padding_size=kw["kv_padding_size"],
        query_padding_size=kw["query_padding_size"], antiquant_scale=kw["antiquant_scale"],
        antiquant_offset=kw["antiquant_offset"], antiquant_mode=kw["antiquant_mode"],
        key_antiquant_scale=kw["key_antiquant_scale"], key_antiquant_offset=kw["key_antiquant_offset"],
        key_antiquant_mode=kw["key_antiquant_mode"], value_antiquant_scale=kw["value_antiquant_scale"],
        value_antiquant_offset=kw["value_antiquant_offset"], value_antiquant_mode=kw["value_antiquant_mode"],
        dequant_scale1=kw["dequant_scale1"], quant_scale1=kw["quant_scale1"],
        dequant_scale2=kw["dequant_scale2"], quant_scale2=kw["quant_scale2"], quant_offset2=kw["quant_offset2"],
        key_shared_prefix=kw["key_shared_prefix"], value_shared_prefix=kw["value_shared_prefix"],
        shared_prefix_len=kw["actual_shared_prefix_len"], query_rope=kw["query_rope"], key_rope=kw["key_rope"],
        inner_precise=kw["inner_precise"], softmax_lse_flag=kw["softmax_lse_flag"],
        names={"q_lens": "actual_seq_lengths", "kv_lens": "actual_seq_lengths_kv"},
    )


def _fia_kwargs(kw: dict) -> dict:
    if kw.get("key_rope_antiquant_scale") is not None:
        C.unsupported(OP, "key_rope_antiquant_scale", "(int8 rope cache)")
    return kw


_FIA_DEFAULTS = dict(
    pse_shift=None, atten_mask=None, actual_seq_lengths=None, actual_seq_lengths_kv=None,
    dequant_scale1=None, quant_scale1=None, dequant_scale2=None, quant_scale2=None, quant_offset2=None,
    antiquant_scale=None, antiquant_offset=None, key_antiquant_scale=None, key_antiquant_offset=None,
    value_antiquant_scale=None, value_antiquant_offset=None, block_table=None, query_padding_size=None,
    kv_padding_size=None, key_shared_prefix=None, value_shared_prefix=None, actual_shared_prefix_len=None,
    query_rope=None, key_rope=None, key_rope_antiquant_scale=None, num_heads=1, scale=1.0,
    pre_tokens=UNBOUNDED, next_tokens=UNBOUNDED, input_layout="BSH", num_key_value_heads=0, sparse_mode=0,
    inner_precise=0, block_size=0, antiquant_mode=0, key_antiquant_mode=0, value_antiquant_mode=0,
    softmax_lse_flag=False,
)


def _full(kw: dict) -> dict:
    unknown = set(kw) - set(_FIA_DEFAULTS)
    if unknown:  # the dispatcher rejects these first; kept for direct Python calls
        raise TypeError(f"{OP}() got unexpected keyword arguments {sorted(unknown)}")
    return _fia_kwargs({**_FIA_DEFAULTS, **kw})


def npu_fused_infer_attention_score(query, key, value, **kw):
    """Reference kernel; see npu-ops.md section 2. Returns (attention_out, softmax_lse)."""
    return run_infer(_fia_args(query, key, value, _full(kw)))


def _fake(query, key, value, **kw):
    return fake_outputs(_fia_args(query, key, value, _full(kw)))


for _name in (OP, f"{OP}.tensor_lengths"):
    torch.library.impl(f"graphgen::{_name}", "CompositeExplicitAutograd")(npu_fused_infer_attention_score)
    torch.library.register_fake(f"graphgen::{_name}")(_fake)
