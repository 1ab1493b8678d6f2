"""`npu_fusion_attention`: the training op (reference kernel, fake kernel, autograd, dropout).

Computes `softmax(scale * (pse + Q.K^T) + mask) . V` with optional dropout and per-head sinks, in
layouts BSH, SBH, BSND, BNSD and TND (varlen, cumulative `actual_seq_qlen`/`actual_seq_kvlen`
without a leading 0). The math is `_core.attend` / `_core.visibility`; this file is about layouts,
sparse modes, dropout reproducibility and checks.

Backward is the separate op `npu_fusion_attention_grad` (upstream's name; returns dq, dk, dv, dpse,
dsink) and is wired to the forward with `torch.library.register_autograd`. It recomputes the
forward under autograd, regenerating the dropout mask from the forward's returned (seed, offset).

Dropout scheme (graphgen's, documented because the device's Philox stream is out of reach):
  * keep_prob == 1: no mask; seed = offset = 0; the RNG state is untouched.
  * keep_prob < 1: seed = torch.initial_seed() mod 2**63, offset = one int64 drawn from torch's
    default CPU generator. So `torch.manual_seed(s)` makes the sequence of masks reproducible, and
    every call gets a fresh mask, exactly as torch's own dropout consumes the default generator.
    (Upstream: the Philox seed/offset of the NPU generator, offset advancing per call.)
  * The keep mask is a pure function of (seed, offset, shape): a CPU torch.Generator seeded with
    `_mix(seed, offset)` draws torch.rand over the padded (B, N, Sq, Skv) score shape and keeps
    entries `< keep_prob`; kept probabilities are divided by keep_prob. Same seed + offset + shapes
    -> same mask on any device, which is what the backward relies on.
  * mask_length is upstream's count of mask bits: B*N*Sq*Skv, or N * sum_b(Sq_b * Skv_b) for TND.

Graph mode: upstream says this op is not supported in graph mode (torchair's converter handles only
BSH/BNSD with keep_prob == 1). Here the fake kernel has exact shapes and the op traces under
torch.compile / torch.export with keep_prob == 1, where seed, offset (0, 0) and mask_length
(computed from shapes) are exact. Because the schema returns `int` (not SymInt) and the autograd
wrapper redispatches through C++, a symbolic mask_length is cast with a guard: tracing with dynamic
dims specializes B*N*Sq*Skv (torch.export then fails its guard on other shapes; torch.compile
recompiles). Export/compile this op with static shapes. The int outputs of a custom op are specialized to the fake
kernel's values at trace time, so a traced call could not return the real seed/offset of a dropout
mask and its backward would regenerate a different one: tracing with keep_prob < 1 is refused.
"""
from __future__ import annotations

import warnings

import torch

from ._checks import check_rank, fail, unsupported
from ._core import UNBOUNDED, UNBOUNDED_TYPO, attend, compute_dtype, visibility
from ._registry import define

OP = "npu_fusion_attention"
GRAD_OP = "npu_fusion_attention_grad"
LAYOUTS = ("BSH", "SBH", "BSND", "BNSD", "TND")
COMPRESSED = 2048  # the (2048, 2048) compressed causal mask of sparse modes 2/3/4/7/8
PREFIX_COMPRESSED = (3072, 2048)  # sparse mode 6
SOFTMAX_STAT_WIDTH = 8  # softmax_max / softmax_sum repeat each row value 8 times

SCHEMA = (
    "(Tensor query, Tensor key, Tensor value, int head_num, str input_layout, Tensor? pse=None, "
    "Tensor? padding_mask=None, Tensor? atten_mask=None, float scale=1., float keep_prob=1., "
    "int pre_tockens=2147483647, int next_tockens=2147483647, int inner_precise=0, int[]? prefix=None, "
    "int[]? actual_seq_qlen=None, int[]? actual_seq_kvlen=None, int sparse_mode=0, "
    "bool gen_mask_parallel=True, bool sync=False, str softmax_layout=\"\", Tensor? sink=None) "
    "-> (Tensor attention_out, Tensor softmax_max, Tensor softmax_sum, Tensor softmax_out, int seed, "
    "int offset, int mask_length)"
)
# Upstream's grad op (op-plugin's meta registration spells it so); dy comes after value.
GRAD_SCHEMA = (
    "(Tensor query, Tensor key, Tensor value, Tensor dy, int head_num, str input_layout, *, "
    "Tensor? pse=None, Tensor? padding_mask=None, Tensor? atten_mask=None, Tensor? softmax_max=None, "
    "Tensor? softmax_sum=None, Tensor? softmax_in=None, Tensor? attention_in=None, float scale_value=1., "
    "float keep_prob=1., int pre_tockens=2147483647, int next_tockens=2147483647, int inner_precise=0, "
    "int seed=0, int offset=0, int numels=0, int[]? prefix=None, int[]? actual_seq_qlen=None, "
    "int[]? actual_seq_kvlen=None, int sparse_mode=0, bool gen_mask_parallel=True, bool sync=False, "
    "str softmax_layout=\"\", Tensor? sink=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
define(OP, SCHEMA)
define(GRAD_OP, GRAD_SCHEMA)


# ----------------------------------------------------------------------------------------- dropout

class _DropoutState:
    """Where (seed, offset) of the next dropout mask come from (replaceable in tests)."""

    def take(self) -> tuple[int, int]:
        seed = torch.initial_seed() & 0x7FFFFFFFFFFFFFFF  # the schema's int is int64
        offset = int(torch.randint(0, 2**62, (), dtype=torch.int64))  # one draw of the default generator
        return seed, offset


_dropout_state = _DropoutState()


def _mix(seed: int, offset: int) -> int:
    """One 63-bit generator seed from (seed, offset) (splitmix64 finalizer)."""
    z = (seed * 0x9E3779B97F4A7C15 + offset + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


def dropout_keep_mask(seed: int, offset: int, shape, keep_prob: float, device) -> torch.Tensor:
    """The keep mask (bool, `shape`) of one call: a pure function of (seed, offset, shape)."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(_mix(seed, offset))
    return (torch.rand(tuple(shape), generator=gen) < keep_prob).to(device)


# ------------------------------------------------------------------------------------------- plan

class _Plan:
    """Everything the kernels need, derived from the arguments once (shapes, lengths, rules)."""

    layout: str
    b: int
    n: int
    nkv: int
    sq: int  # padded query length (max over sequences for TND)
    skv: int
    d: int
    dv: int
    q_lens: list[int] | None  # TND only: per-sequence lengths
    kv_lens: list[int] | None
    total_q: int  # TND: T of query



def _cum_to_lens(name: str, cum: list[int], total: int) -> list[int]:
    """Cumulative ends without a leading 0 -> lengths. Trailing zeros mark batches that do not take
    part (upstream: [2, 5, 9, 0, 0] is three sequences)."""
    if not cum:
        fail(OP, name, "is empty", "pass the cumulative sequence ends, e.g. [100, 300, 450, 1000]")
    ends = list(cum)
    while len(ends) > 1 and ends[-1] == 0:
        ends.pop()
    prev, lens = 0, []
    for e in ends:
        if e < prev:
            fail(OP, name, f"= {list(cum)} is not non-decreasing",
                 "pass cumulative ends without a leading 0 (lengths 2,2,2 -> [2, 4, 6])")
        lens.append(e - prev)
        prev = e
    if prev > total:
        fail(OP, name, f"ends at {prev} but the tensor has only {total} tokens (dim 0)",
             "pass cumulative ends that fit the TND tensor")
    return lens


def _plan(query, key, value, head_num, input_layout, actual_seq_qlen, actual_seq_kvlen) -> _Plan:
    p = _Plan()
    layout = input_layout.upper()  # upstream compares case-insensitively
    if layout not in LAYOUTS:
        fail(OP, "input_layout", f"is {input_layout!r}",
             "The input_layout should be BSH/SBH/BNSD/BSND/TND (case-insensitive); "
             "a (batch, seq, heads, head_dim) tensor is 'BSND'")
    p.layout = layout
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_rank(OP, name, t, layout)
    if head_num <= 0:
        fail(OP, "head_num", f"is {head_num}", "pass the number of query heads")
    if layout in ("BSH", "SBH"):
        h = query.shape[2]
        if h % head_num:
            fail(OP, "head_num", f"({head_num}) does not divide the hidden size of query ({h})",
                 "pass head_num such that hidden = head_num * head_dim")
        p.d = h // head_num
        if key.shape[2] % p.d:
            fail(OP, "key", f"hidden size {key.shape[2]} is not a multiple of head_dim {p.d}",
                 "pass key/value with num_kv_heads * head_dim hidden")
        p.nkv = key.shape[2] // p.d
        if value.shape[2] % p.nkv:
            fail(OP, "value", f"hidden size {value.shape[2]} is not a multiple of num_kv_heads {p.nkv}",
                 "pass value with num_kv_heads * head_dim_v hidden")
        p.dv = value.shape[2] // p.nkv
        bdim, sdim = (0, 1) if layout == "BSH" else (1, 0)
        p.b, p.sq, p.skv = query.shape[bdim], query.shape[sdim], key.shape[sdim]
        kv_b, v_s = key.shape[bdim], value.shape[sdim]
    else:
        ndim, sdim = {"BNSD": (1, 2), "BSND": (2, 1), "TND": (1, 0)}[layout]
        if query.shape[ndim] != head_num:
            fail(OP, "head_num", f"is {head_num} but query has {query.shape[ndim]} heads "
                 f"(dim {ndim} of {layout})", "pass head_num equal to the query's head dim")
        p.d, p.dv = query.shape[-1], value.shape[-1]
        p.nkv = key.shape[ndim]
        if value.shape[ndim] != p.nkv:
            fail(OP, "value", f"has {value.shape[ndim]} heads but key has {p.nkv}", "pass key/value alike")
        p.b = 1 if layout == "TND" else query.shape[0]
        p.sq, p.skv = query.shape[sdim], key.shape[sdim]
        kv_b = p.b if layout == "TND" else key.shape[0]
        v_s = value.shape[sdim]
        if key.shape[-1] != p.d:
            fail(OP, "key", f"head_dim {key.shape[-1]} differs from query's {p.d}", "pass Dq == Dk")
    p.n = head_num
    if kv_b != p.b:
        fail(OP, "key", f"batch {kv_b} differs from query's {p.b}", "pass equal batch sizes")
    if v_s != p.skv:
        fail(OP, "value", f"sequence length {v_s} differs from key's {p.skv}", "pass key/value alike")
    if p.nkv <= 0 or p.n % p.nkv:
        fail(OP, "key", f"has {p.nkv} heads, which does not divide head_num={p.n}",
             "GQA needs head_num to be a multiple of the key/value head count")
    if p.dv > p.d:
        fail(OP, "value", f"head_dim {p.dv} exceeds key's {p.d}", "upstream requires Dk >= Dv")

    p.q_lens = p.kv_lens = None
    p.total_q = query.shape[0]
    if layout == "TND":
        if actual_seq_qlen is None or actual_seq_kvlen is None:
            fail(OP, "actual_seq_qlen/actual_seq_kvlen", "are required with input_layout='TND'",
                 "pass the cumulative ends of every sequence, e.g. [100, 300, 450, 1000]")
        if len(actual_seq_qlen) != len(actual_seq_kvlen):
            fail(OP, "actual_seq_qlen/actual_seq_kvlen", f"have {len(actual_seq_qlen)} and "
                 f"{len(actual_seq_kvlen)} entries", "the size of actual_seq_qlen and actual_seq_kvlen must be the same")
        p.q_lens = _cum_to_lens("actual_seq_qlen", actual_seq_qlen, query.shape[0])
        p.kv_lens = _cum_to_lens("actual_seq_kvlen", actual_seq_kvlen, key.shape[0])
        if len(p.q_lens) != len(p.kv_lens):
            fail(OP, "actual_seq_qlen/actual_seq_kvlen", "describe different numbers of sequences",
                 "pass the same batches in both (trailing zeros alike)")
        p.b = len(p.q_lens)
        p.sq, p.skv = max(max(p.q_lens), 1), max(max(p.kv_lens), 1)
    elif actual_seq_qlen is not None or actual_seq_kvlen is not None:
        fail(OP, "actual_seq_qlen/actual_seq_kvlen", f"are given with input_layout={layout!r}",
             "they describe varlen batches: use input_layout='TND' or drop them")
    return p


def _mask_length(p: _Plan):
    if p.layout == "TND":
        return p.n * sum(a * b for a, b in zip(p.q_lens, p.kv_lens))
    return p.b * p.n * p.sq * p.skv


def _check_args(query, key, value, p: _Plan, pse, padding_mask, atten_mask, keep_prob, pre_tockens,
                next_tockens, inner_precise, prefix, sparse_mode, softmax_layout, sink) -> None:
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            fail(OP, name, f"has dtype {t.dtype} but query has {query.dtype}",
                 "query/key/value (and pse) must share one dtype")
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        fail(OP, "query", f"has dtype {query.dtype}", "pass float16/bfloat16/float32 tensors")
    if padding_mask is not None:
        fail(OP, "padding_mask", "is reserved upstream and not supported", "drop padding_mask; use atten_mask")
    if not (0.0 < keep_prob <= 1.0):
        fail(OP, "keep_prob", f"is {keep_prob}", "The keep_prob value must be in range of (0, 1]")
    if inner_precise not in (0, 1, 2):
        fail(OP, "inner_precise", f"is {inner_precise}", "pass 0/1 (reserved) or 2 (invalid-row computation)")
    if p.layout == "TND":
        if sparse_mode not in (0, 1, 2, 3, 4, 6, 7, 8):
            fail(OP, "sparse_mode", f"is {sparse_mode} with input_layout='TND'",
                 "The sparse_mode value must be in range of [0,5) or (5,8] for TND (5 is not varlen)")
    elif sparse_mode not in range(7):
        fail(OP, "sparse_mode", f"is {sparse_mode} with input_layout={p.layout!r}",
             "The sparse_mode value must be in range of [0,6]; 7/8 are varlen (TND) only")
    if softmax_layout not in ("", "TND"):
        fail(OP, "softmax_layout", f"is {softmax_layout!r}", "pass '' or 'TND'")
    if softmax_layout == "TND" and p.layout != "TND":
        fail(OP, "softmax_layout", "is 'TND' but input_layout is not", "softmax_layout='TND' is for TND inputs only")
    if pse is not None:
        if pse.dtype != query.dtype:
            fail(OP, "pse", f"has dtype {pse.dtype} but query has {query.dtype}", "pass pse in the query's dtype")
        if p.layout == "TND":
            unsupported(OP, "pse", "with input_layout='TND' (varlen and alibi-compressed position bias)")
        if sparse_mode in (7, 8):
            fail(OP, "pse", f"is given with sparse_mode={sparse_mode}", "sparse_mode 7/8 do not support pse")
        ok = pse.dim() == 4 and pse.shape[0] in (1, p.b) and pse.shape[1] == p.n \
            and pse.shape[2] in (1, p.sq) and pse.shape[3] == p.skv
        if not ok:
            if pse.dim() == 4 and pse.shape[2] == 1024 and p.sq > 1024:
                unsupported(OP, "pse", "in the alibi-compressed form (last 1024 rows)")
            fail(OP, "pse", f"has shape {tuple(pse.shape)}",
                 f"pass BNSS ({p.b}, {p.n}, {p.sq}, {p.skv}), 1NSS or BN1S (Skv) position bias")
    if sink is not None:
        if sink.dim() != 1 or sink.shape[0] != p.n:
            fail(OP, "sink", f"has shape {tuple(sink.shape)}", f"pass one fp32 logit per query head: ({p.n},)")
        if sink.dtype not in (torch.float32, torch.float64):
            fail(OP, "sink", f"has dtype {sink.dtype}", "pass sink as float32")
    if atten_mask is not None:
        if atten_mask.dtype not in (torch.bool, torch.uint8, torch.int8):
            fail(OP, "atten_mask", f"has dtype {atten_mask.dtype}", "pass a bool/uint8 mask where 1 means masked out")
        _check_mask_shape(atten_mask, p, sparse_mode)
    if sparse_mode in (5, 6):
        if prefix is None:
            fail(OP, "prefix", f"is required with sparse_mode={sparse_mode}",
                 "pass the per-batch count of prefix key columns")
        if len(prefix) != p.b:
            fail(OP, "prefix", f"has {len(prefix)} entries for batch {p.b}", "pass one prefix count per batch")
        if p.layout != "TND":
            lo = 0 if p.sq > p.skv else p.skv - p.sq
            bad = [x for x in prefix if not lo <= x <= p.skv]
            if bad:
                fail(OP, "prefix", f"has {bad} outside [{lo}, {p.skv}]",
                     "prefix N must be in [0, Skv] when Sq > Skv, else in [Skv - Sq, Skv]")
    for name, v in (("pre_tockens", pre_tockens), ("next_tockens", next_tockens)):
        if not -(2 ** 63) <= v < 2 ** 63:
            fail(OP, name, f"is {v}", "pass an int64")


def _check_mask_shape(mask: torch.Tensor, p: _Plan, sparse_mode: int) -> None:
    shape = tuple(mask.shape)
    if sparse_mode in (2, 3, 4, 7, 8):
        if shape not in ((COMPRESSED, COMPRESSED), (1, COMPRESSED, COMPRESSED), (1, 1, COMPRESSED, COMPRESSED)):
            fail(OP, "atten_mask", f"has shape {shape} with sparse_mode={sparse_mode}",
                 "pass the compressed mask torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)")
        return
    if sparse_mode == 6:
        if shape != PREFIX_COMPRESSED:
            fail(OP, "atten_mask", f"has shape {shape} with sparse_mode=6",
                 "pass the (3072, 2048) compressed prefix mask: triu(2048x2048, 1) over [1024x2048 with "
                 "the left half 0 and the right half 1]")
        return
    if p.layout == "TND":
        if shape != (p.sq, p.skv):
            fail(OP, "atten_mask", f"has shape {shape} with input_layout='TND'",
                 f"varlen takes an SS mask of (max Sq, max Skv) = ({p.sq}, {p.skv})")
        return
    ok = (mask.dim() == 2 and shape == (p.sq, p.skv)) or (
        mask.dim() == 4 and shape[0] in (1, p.b) and shape[1] in (1, p.n) and shape[2:] == (p.sq, p.skv))
    if sparse_mode == 5:
        ok = ok and mask.dim() == 4 and shape[0] == p.b
    if not ok:
        want = "BNSS or B1SS" if sparse_mode == 5 else "BNSS, B1SS, 11SS or SS"
        fail(OP, "atten_mask", f"has shape {shape}",
             f"pass a {want} mask with S = ({p.sq}, {p.skv}) (1 = masked out)")


# --------------------------------------------------------------------------------------- layouts

def _to_bnsd(x: torch.Tensor, layout: str, heads: int) -> torch.Tensor:
    if layout == "BSH":
        b, s, h = x.shape
        return x.view(b, s, heads, h // heads).transpose(1, 2)
    if layout == "SBH":
        s, b, h = x.shape
        return x.view(s, b, heads, h // heads).permute(1, 2, 0, 3)
    if layout == "BSND":
        return x.transpose(1, 2)
    return x


def _from_bnsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    b, n, s, d = x.shape
    if layout == "BSH":
        return x.transpose(1, 2).reshape(b, s, n * d)
    if layout == "SBH":
        return x.permute(2, 0, 1, 3).reshape(s, b, n * d)
    if layout == "BSND":
        return x.transpose(1, 2).contiguous()
    return x.contiguous()


def _varlen_index(lens: list[int], width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, width) token index of each padded slot (clamped into range) and the (T,) pair
    (sequence, position) of each token."""
    lens_t = torch.tensor(lens, dtype=torch.int64, device=device)
    starts = torch.cumsum(lens_t, 0) - lens_t
    idx = starts.view(-1, 1) + torch.arange(width, device=device)
    return idx, lens_t


def _tnd_to_padded(x: torch.Tensor, lens: list[int], width: int) -> torch.Tensor:
    """(T, N, D) -> (B, N, width, D): slot (b, i) holds token start_b + i (clamped; masked later)."""
    idx, _ = _varlen_index(lens, width, x.device)
    idx = idx.clamp(0, max(x.shape[0] - 1, 0))
    return x[idx].permute(0, 2, 1, 3)


def _padded_to_tnd(x: torch.Tensor, lens: list[int], total: int) -> torch.Tensor:
    """(B, N, W, ...) -> (total, N, ...); tokens past the last sequence are zero."""
    lens_t = torch.tensor(lens, dtype=torch.int64, device=x.device)
    ends = torch.cumsum(lens_t, 0)
    t = torch.arange(total, device=x.device)
    seq = torch.searchsorted(ends, t, right=True)
    valid = seq < len(lens)
    seq = seq.clamp(max=len(lens) - 1)
    pos = (t - (ends - lens_t)[seq]).clamp(0, x.shape[2] - 1)
    out = x[seq, :, pos]
    return torch.where(valid.view(-1, *([1] * (out.dim() - 1))), out, torch.zeros_like(out))


# --------------------------------------------------------------------------------------- masking

def _visible(p: _Plan, atten_mask, pre, nxt, sparse_mode, prefix, device) -> torch.Tensor | None:
    """bool (B, 1|N, Sq, Skv) visibility, or None for 'everything (within lengths)'."""
    if p.layout == "TND":
        q_lens = torch.tensor(p.q_lens, dtype=torch.int64, device=device)
        kv_lens = torch.tensor(p.kv_lens, dtype=torch.int64, device=device)
    else:
        q_lens = torch.full((p.b,), p.sq, dtype=torch.int64, device=device)
        kv_lens = torch.full((p.b,), p.skv, dtype=torch.int64, device=device)
    if atten_mask is None:
        if sparse_mode != 0:
            warnings.warn(f"{OP}: sparse_mode={sparse_mode} without atten_mask computes full attention "
                          "(upstream: without atten_mask, sparse_mode/pre_tockens/next_tockens have no effect); "
                          "pass the mask the mode expects", stacklevel=4)
        if p.layout != "TND":
            return None
        return visibility(p.sq, p.skv, q_lens=q_lens, kv_lens=kv_lens)

    def vis(**kw):
        return visibility(p.sq, p.skv, q_lens=q_lens, kv_lens=kv_lens, **kw)

    if sparse_mode in (0, 1):
        m = atten_mask.to(torch.bool)
        if m.dim() == 2:
            m = m.view(1, 1, *m.shape)
        if sparse_mode == 0:
            return vis(band="top_left", pre_tokens=pre, next_tokens=nxt, masked=m)
        return vis(masked=m)
    if sparse_mode == 2:
        return vis(causal="top_left")
    if sparse_mode == 3:
        return vis(causal="bottom_right")
    if sparse_mode == 4:
        return vis(band="bottom_right", pre_tokens=pre, next_tokens=nxt)
    if sparse_mode in (5, 6):
        px = torch.tensor(prefix, dtype=torch.int64, device=device)
        return vis(causal="bottom_right", prefix=px)
    # 7 / 8: the query of one sequence was split across devices: that sequence (the last one for
    # 7, the first for 8) is a bottom-right band given by pre/next; the others keep mode 3 / 2.
    causal = vis(causal="bottom_right" if sparse_mode == 7 else "top_left")
    band = vis(band="bottom_right", pre_tokens=pre, next_tokens=nxt)
    which = torch.zeros(p.b, dtype=torch.bool, device=device)
    which[-1 if sparse_mode == 7 else 0] = True
    return torch.where(which.view(-1, 1, 1, 1), band, causal)


# ----------------------------------------------------------------------------------------- forward

def _forward_math(query, key, value, p: _Plan, *, pse, atten_mask, scale, keep_prob, pre_tockens,
                  next_tockens, prefix, sparse_mode, sink, seed, offset):
    """Differentiable forward: (attention_out in the query layout, row_max, row_sum) with the
    statistics as (B, N, Sq) (or (T, N) for TND) in the compute dtype."""
    if p.layout == "TND":
        q = _tnd_to_padded(query, p.q_lens, p.sq)
        k = _tnd_to_padded(key, p.kv_lens, p.skv)
        v = _tnd_to_padded(value, p.kv_lens, p.skv)
    else:
        q = _to_bnsd(query, p.layout, p.n)
        k = _to_bnsd(key, p.layout, p.nkv)
        v = _to_bnsd(value, p.layout, p.nkv)
    vis = _visible(p, atten_mask, pre_tockens, next_tockens, sparse_mode, prefix, query.device)
    bias = None if pse is None else pse.to(compute_dtype(query)) * scale  # scale * (pse + Q.K^T)
    keep = None
    if keep_prob < 1.0:
        keep = dropout_keep_mask(seed, offset, (p.b, p.n, p.sq, p.skv), keep_prob, query.device)
    res = attend(q, k, v, scale=scale, visible=vis, bias=bias, sink=sink, dropout_keep=keep, keep_prob=keep_prob)
    out = res.out
    if vis is not None:  # rows with nothing visible (incl. padding) are exact zeros
        out = torch.where(vis.any(-1, keepdim=True), out, torch.zeros_like(out))
    if p.layout == "TND":
        total = p.total_q
        return (_padded_to_tnd(out, p.q_lens, total).to(query.dtype),
                _padded_to_tnd(res.row_max.unsqueeze(-1), p.q_lens, total).squeeze(-1),
                _padded_to_tnd(res.row_sum.unsqueeze(-1), p.q_lens, total).squeeze(-1))
    return _from_bnsd(out, p.layout).to(query.dtype), res.row_max, res.row_sum


def _stat(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(torch.float32).unsqueeze(-1).expand(*x.shape, SOFTMAX_STAT_WIDTH).contiguous()


def _unbounded(v: int) -> int:
    return UNBOUNDED if v in (UNBOUNDED, UNBOUNDED_TYPO) else v


@torch.library.impl(f"graphgen::{OP}", "CompositeExplicitAutograd")
def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
                         atten_mask=None, scale=1.0, keep_prob=1.0, pre_tockens=UNBOUNDED,
                         next_tockens=UNBOUNDED, inner_precise=0, prefix=None, actual_seq_qlen=None,
                         actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True, sync=False,
                         softmax_layout="", sink=None):
    """Reference kernel. Returns (attention_out (query's layout and dtype), softmax_max,
    softmax_sum (fp32 (B, N, Sq, 8) or (T, N, 8) for TND), softmax_out (empty), seed, offset,
    mask_length)."""
    p = _plan(query, key, value, head_num, input_layout, actual_seq_qlen, actual_seq_kvlen)
    _check_args(query, key, value, p, pse, padding_mask, atten_mask, keep_prob, pre_tockens,
                next_tockens, inner_precise, prefix, sparse_mode, softmax_layout, sink)
    mask_length = _mask_length(p)
    seed, offset = _dropout_state.take() if keep_prob < 1.0 else (0, 0)
    with torch.no_grad():
        out, row_max, row_sum = _forward_math(
            query, key, value, p, pse=pse, atten_mask=atten_mask, scale=scale, keep_prob=keep_prob,
            pre_tockens=_unbounded(pre_tockens), next_tockens=_unbounded(next_tockens), prefix=prefix,
            sparse_mode=sparse_mode, sink=sink, seed=seed, offset=offset)
    return out, _stat(row_max), _stat(row_sum), query.new_empty((0,)), seed, offset, mask_length


@torch.library.register_fake(f"graphgen::{OP}")
def _npu_fusion_attention_fake(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
                               atten_mask=None, scale=1.0, keep_prob=1.0, pre_tockens=UNBOUNDED,
                               next_tockens=UNBOUNDED, inner_precise=0, prefix=None, actual_seq_qlen=None,
                               actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True, sync=False,
                               softmax_layout="", sink=None):
    p = _plan(query, key, value, head_num, input_layout, actual_seq_qlen, actual_seq_kvlen)
    _check_args(query, key, value, p, pse, padding_mask, atten_mask, keep_prob, pre_tockens,
                next_tockens, inner_precise, prefix, sparse_mode, softmax_layout, sink)
    if keep_prob < 1.0:
        raise RuntimeError(
            f"{OP}: keep_prob={keep_prob} (dropout) cannot be traced (torch.compile / torch.export): the "
            "returned seed/offset ints would be frozen at trace time and the backward could not "
            "regenerate the mask. Upstream does not support this op in graph mode either; call it eagerly "
            "(e.g. under torch.compiler.disable) or use keep_prob=1.")
    out = _out_shape(query, value, p)
    stat_shape = (query.shape[0], p.n, SOFTMAX_STAT_WIDTH) if p.layout == "TND" else (p.b, p.n, p.sq, SOFTMAX_STAT_WIDTH)
    f32 = dict(dtype=torch.float32, device=query.device)
    # mask_length is exact; with dynamic dims torch casts this SymInt to the schema's `int` when the
    # autograd wrapper redispatches, which guards B*N*Sq*Skv to its trace-time value (see module doc).
    mask_length = _mask_length(p)
    return (query.new_empty(out), torch.empty(stat_shape, **f32), torch.empty(stat_shape, **f32),
            query.new_empty((0,)), 0, 0, mask_length)


def _out_shape(query, value, p: _Plan):
    if p.layout in ("BSH", "SBH"):
        return (*query.shape[:2], p.n * p.dv)
    return (*query.shape[:-1], p.dv)


# ---------------------------------------------------------------------------------------- backward

@torch.library.impl(f"graphgen::{GRAD_OP}", "CompositeExplicitAutograd")
def npu_fusion_attention_grad(query, key, value, dy, head_num, input_layout, *, pse=None, padding_mask=None,
                              atten_mask=None, softmax_max=None, softmax_sum=None, softmax_in=None,
                              attention_in=None, scale_value=1.0, keep_prob=1.0, pre_tockens=UNBOUNDED,
                              next_tockens=UNBOUNDED, inner_precise=0, seed=0, offset=0, numels=0,
                              prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                              gen_mask_parallel=True, sync=False, softmax_layout="", sink=None):
    """(dq, dk, dv, dpse, dsink) of attention_out w.r.t. its inputs, for upstream gradient dy.

    Recomputes the forward (same dropout mask from seed/offset) under autograd. dpse is empty (0,)
    without pse; dsink is a 0-dim tensor without sink (upstream's shapes)."""
    p = _plan(query, key, value, head_num, input_layout, actual_seq_qlen, actual_seq_kvlen)
    _check_args(query, key, value, p, pse, padding_mask, atten_mask, keep_prob, pre_tockens,
                next_tockens, inner_precise, prefix, sparse_mode, softmax_layout, sink)
    inputs = [t.detach().requires_grad_(True) for t in (query, key, value)]
    pse_in = None if pse is None else pse.detach().requires_grad_(True)
    sink_in = None if sink is None else sink.detach().requires_grad_(True)
    with torch.enable_grad():
        out, _, _ = _forward_math(
            *inputs, p, pse=pse_in, atten_mask=atten_mask, scale=scale_value, keep_prob=keep_prob,
            pre_tockens=_unbounded(pre_tockens), next_tockens=_unbounded(next_tockens), prefix=prefix,
            sparse_mode=sparse_mode, sink=sink_in, seed=seed, offset=offset)
        wrt = inputs + [t for t in (pse_in, sink_in) if t is not None]
        grads = torch.autograd.grad(out, wrt, dy, allow_unused=True)
    grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]
    dq, dk, dv = grads[:3]
    rest = grads[3:]
    dpse = rest.pop(0) if pse is not None else query.new_empty((0,))
    dsink = rest.pop(0) if sink is not None else query.new_empty(())
    return dq, dk, dv, dpse, dsink


@torch.library.register_fake(f"graphgen::{GRAD_OP}")
def _npu_fusion_attention_grad_fake(query, key, value, dy, head_num, input_layout, *, pse=None,
                                    padding_mask=None, atten_mask=None, softmax_max=None, softmax_sum=None,
                                    softmax_in=None, attention_in=None, scale_value=1.0, keep_prob=1.0,
                                    pre_tockens=UNBOUNDED, next_tockens=UNBOUNDED, inner_precise=0, seed=0,
                                    offset=0, numels=0, prefix=None, actual_seq_qlen=None,
                                    actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True, sync=False,
                                    softmax_layout="", sink=None):
    dpse = query.new_empty((0,)) if pse is None else torch.empty_like(pse)
    dsink = query.new_empty(()) if sink is None else torch.empty_like(sink)
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), dpse, dsink


_FWD_ARGS = ("query", "key", "value", "head_num", "input_layout", "pse", "padding_mask", "atten_mask",
             "scale", "keep_prob", "pre_tockens", "next_tockens", "inner_precise", "prefix",
             "actual_seq_qlen", "actual_seq_kvlen", "sparse_mode", "gen_mask_parallel", "sync",
             "softmax_layout", "sink")


def _setup_context(ctx, inputs, output):
    args = dict(zip(_FWD_ARGS, inputs))
    ctx.args = {k: v for k, v in args.items() if not isinstance(v, torch.Tensor)}
    ctx.has = {k: isinstance(args[k], torch.Tensor) for k in ("pse", "atten_mask", "sink")}
    ctx.seed, ctx.offset, ctx.mask_length = output[4], output[5], output[6]
    ctx.save_for_backward(args["query"], args["key"], args["value"], args["pse"], args["atten_mask"], args["sink"])


def make_backward(grad_op):
    """The autograd formula for a forward op with this schema whose backward is `grad_op`
    (torch.ops.graphgen.npu_fusion_attention_grad, or its npu mirror under emulation)."""

    def backward(ctx, d_out, d_max, d_sum, d_softmax_out, *_ints):
        query, key, value, pse, atten_mask, sink = ctx.saved_tensors
        a = ctx.args
        dq, dk, dv, dpse, dsink = grad_op(
            query, key, value, d_out, a["head_num"], a["input_layout"], pse=pse, atten_mask=atten_mask,
            scale_value=a["scale"], keep_prob=a["keep_prob"], pre_tockens=a["pre_tockens"],
            next_tockens=a["next_tockens"], inner_precise=a["inner_precise"], seed=ctx.seed,
            offset=ctx.offset, numels=ctx.mask_length, prefix=a["prefix"], actual_seq_qlen=a["actual_seq_qlen"],
            actual_seq_kvlen=a["actual_seq_kvlen"], sparse_mode=a["sparse_mode"],
            gen_mask_parallel=a["gen_mask_parallel"], sync=a["sync"], softmax_layout=a["softmax_layout"],
            sink=sink)
        grads = {"query": dq, "key": dk, "value": dv,
                 "pse": dpse if ctx.has["pse"] else None, "sink": dsink if ctx.has["sink"] else None}
        return tuple(grads.get(name) for name in _FWD_ARGS)

    return backward


def register_autograd(qualname: str, grad_op) -> None:
    torch.library.register_autograd(qualname, make_backward(grad_op), setup_context=_setup_context)


register_autograd(f"graphgen::{OP}", torch.ops.graphgen.npu_fusion_attention_grad)
