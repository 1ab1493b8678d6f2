"""Input checks shared by the NPU ops: device constraints turned into errors people can act on.

Every message says which op, which argument, what was wrong and what to pass instead, in the
style of the seed document's troubleshooting section. Checks on shapes use `known_true`, so they
never add guards on symbolic (dynamic) dims while tracing: a check that cannot be decided at trace
time is left to the eager kernel, where every size is a plain int.
"""
from __future__ import annotations

from typing import Iterable

import torch

try:  # never guards: True only when the condition holds for every value of the symbols
    from torch.fx.experimental.symbolic_shapes import statically_known_true as _known_true
except ImportError:  # pragma: no cover - older torch
    def _known_true(x):  # type: ignore[misc]
        return bool(x)

LAYOUT_RANKS = {"BSH": 3, "BNSD": 4, "BSND": 4, "TND": 3, "SBH": 3}
LAYOUT_SHAPES = {
    "BSH": "(batch, seq, num_heads*head_dim)",
    "BNSD": "(batch, num_heads, seq, head_dim)",
    "BSND": "(batch, seq, num_heads, head_dim)",
    "TND": "(total_tokens, num_heads, head_dim)",
    "SBH": "(seq, batch, num_heads*head_dim)",
}
MAX_GQA_RATIO = 64
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def known_true(cond) -> bool:
    """True when `cond` (bool or SymBool) is certainly true; never installs a guard."""
    return bool(cond) if isinstance(cond, bool) else _known_true(cond)


def fail(op: str, arg: str, problem: str, fix: str) -> None:
    """Raise ValueError('<op>: <arg> <problem>; <fix>')."""
    raise ValueError(f"{op}: {arg} {problem}; {fix}")


def unsupported(op: str, arg: str, why: str) -> None:
    """Raise NotImplementedError for an argument whose device semantics graphgen does not reproduce."""
    raise NotImplementedError(f"{op}: {arg} {why} is not implemented by graphgen's reference kernel")


def check_layout(op: str, layout: str, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if layout not in allowed:
        fail(op, "input_layout", f"is {layout!r}, which this op does not support",
             f"pass one of {', '.join(repr(a) for a in allowed)}")


def check_rank(op: str, name: str, t: torch.Tensor, layout: str, rank: int | None = None) -> None:
    """input shapes mismatch: `t` must have the rank of `layout` (or `rank` when given)."""
    want = LAYOUT_RANKS[layout] if rank is None else rank
    if t.dim() != want:
        fail(op, name, f"has {t.dim()} dims {tuple(t.shape)} but input_layout={layout!r} needs {want} "
             f"dims {LAYOUT_SHAPES[layout]}",
             "pass input_layout matching the tensor (BSH/TND are 3-D, BNSD/BSND 4-D) or reshape the tensor")


def check_head_dim(op: str, head_dim, *, int8: bool = False, name: str = "head_dim") -> None:
    align = 32 if int8 else 16
    if known_true(head_dim % align != 0):
        kind = "int8 key/value" if int8 else "the NPU cube unit"
        fail(op, name, f"is {head_dim}, not a multiple of {align} (required by {kind})",
             f"pad head_dim up to a multiple of {align} (e.g. {((int(head_dim) + align - 1) // align) * align})")


def check_heads(op: str, num_heads, num_kv_heads) -> None:
    if known_true(num_kv_heads <= 0) or known_true(num_heads <= 0):
        fail(op, "num_heads/num_key_value_heads", f"are {num_heads}/{num_kv_heads}",
             "pass positive head counts (num_key_value_heads=0 means num_heads)")
    if known_true(num_heads % num_kv_heads != 0):
        fail(op, "num_key_value_heads", f"({num_kv_heads}) does not divide num_heads ({num_heads})",
             "pass a num_key_value_heads that divides num_heads (GQA groups must be equal)")
    if known_true(num_heads // num_kv_heads > MAX_GQA_RATIO):
        fail(op, "num_heads/num_key_value_heads", f"ratio is {num_heads // num_kv_heads}, above "
             f"{MAX_GQA_RATIO}", f"use at least num_heads/{MAX_GQA_RATIO} key/value heads")


def check_bsh_hidden(op: str, name: str, hidden, num_heads, arg: str = "num_heads") -> None:
    if known_true(hidden % num_heads != 0):
        fail(op, arg, f"({num_heads}) does not divide the hidden size of {name} ({hidden}) for BSH",
             f"pass {arg} such that hidden = {arg} * head_dim")


def check_choice(op: str, arg: str, value, allowed: Iterable, what: str = "") -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        fail(op, arg, f"is {value!r}, out of range for this op{what}",
             f"pass one of {', '.join(str(a) for a in allowed)}")


def check_dtype(op: str, name: str, t: torch.Tensor, allowed: Iterable[torch.dtype], fix: str = "") -> None:
    allowed = tuple(allowed)
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        fail(op, name, f"has dtype {str(t.dtype).replace('torch.', '')}, expected {names}",
             fix or f"pass {name}.to(torch.{str(allowed[0]).replace('torch.', '')})")


def check_same_dtype(op: str, names: Iterable[str], tensors: Iterable[torch.Tensor]) -> None:
    names, tensors = tuple(names), tuple(tensors)
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        got = ", ".join(f"{n}={str(t.dtype).replace('torch.', '')}" for n, t in zip(names, tensors))
        fail(op, "/".join(names), f"have different dtypes ({got})", "pass them in one dtype")


def require(op: str, arg: str, present: bool, when: str, fix: str | None = None) -> None:
    if not present:
        fail(op, arg, f"is required {when}", fix or f"pass {arg}")


def forbid(op: str, arg: str, present: bool, when: str, fix: str | None = None) -> None:
    if present:
        fail(op, arg, f"is not allowed {when}", fix or f"drop {arg}")


def check_block_table(op: str, block_table: torch.Tensor) -> None:
    if block_table.dim() != 2:
        fail(op, "block_table", f"has shape {tuple(block_table.shape)}",
             "pass a 2-D (batch, max_blocks_per_seq) block table")
    check_dtype(op, "block_table", block_table, (torch.int32,),
                "the device takes int32 only: pass block_table.to(torch.int32)")


def check_mask_dtype(op: str, mask: torch.Tensor) -> None:
    if mask.dtype not in (torch.bool, torch.int8, torch.uint8) and not mask.dtype.is_floating_point:
        fail(op, "atten_mask", f"has dtype {mask.dtype}", "pass a bool/int8/uint8 mask where 1 means masked out")


def with_defaults(op: str, kw: dict, defaults: dict, padding_mask_fix: str) -> dict:
    """kw filled with the schema's defaults. Unknown keywords (the dispatcher rejects them first;
    kept for direct Python calls) and padding_mask (reserved upstream) are refused."""
    unknown = set(kw) - set(defaults)
    if unknown:
        raise TypeError(f"{op}() got unexpected keyword arguments {sorted(unknown)}")
    kw = {**defaults, **kw}
    forbid(op, "padding_mask", kw["padding_mask"] is not None, "(reserved upstream, not supported)", padding_mask_fix)
    return kw
