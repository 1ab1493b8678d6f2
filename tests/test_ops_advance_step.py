"""npu_advance_step_flashattn: in-place update vs a naive per-row loop; checks; eager, fake kernel
under torch.export and torch.compile(fullgraph=True)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import graphgen.ops  # noqa: F401
import graphgen.ops.advance_step  # noqa: F401

op = torch.ops.graphgen.npu_advance_step_flashattn


def make_state(num_seqs, num_queries, block_size, max_blocks, *, gen, bt_dtype=torch.int64, sampled_2d=True):
    seq_lens = torch.randint(0, block_size * max_blocks, (num_seqs,), generator=gen)
    return dict(
        input_tokens=torch.randint(0, 1000, (num_seqs,), generator=gen),
        sampled_token_ids=torch.randint(0, 1000, (num_queries, 1) if sampled_2d else (num_queries,), generator=gen),
        input_positions=torch.randint(0, 1000, (num_seqs,), generator=gen),
        seq_lens=seq_lens,
        slot_mapping=torch.randint(0, 1000, (num_seqs,), generator=gen),
        block_tables=torch.randint(0, 500, (num_seqs, max_blocks), generator=gen).to(bt_dtype),
    )


def naive_advance(s, num_queries, block_size):
    s = {k: v.clone() for k, v in s.items()}
    for i in range(num_queries):
        pos = int(s["seq_lens"][i])
        s["input_tokens"][i] = s["sampled_token_ids"].reshape(-1)[i]
        s["input_positions"][i] = pos
        s["seq_lens"][i] = pos + 1
        s["slot_mapping"][i] = int(s["block_tables"][i, pos // block_size]) * block_size + pos % block_size
    return s


def call(s, num_seqs, num_queries, block_size, fn=op):
    fn(s["input_tokens"], s["sampled_token_ids"], s["input_positions"], s["seq_lens"], s["slot_mapping"],
       s["block_tables"], num_seqs, num_queries, block_size)


@settings(max_examples=50, deadline=None)
@given(num_seqs=st.integers(2, 12), frac=st.floats(0, 1), block_size=st.sampled_from([1, 4, 16]),
       max_blocks=st.integers(1, 6), bt_dtype=st.sampled_from([torch.int32, torch.int64]),
       sampled_2d=st.booleans(), seed=st.integers(0, 1000))
def test_matches_naive(num_seqs, frac, block_size, max_blocks, bt_dtype, sampled_2d, seed):
    num_queries = 1 + int(frac * (num_seqs - 2))
    s = make_state(num_seqs, num_queries, block_size, max_blocks, gen=torch.Generator().manual_seed(seed),
                   bt_dtype=bt_dtype, sampled_2d=sampled_2d)
    want = naive_advance(s, num_queries, block_size)
    call(s, num_seqs, num_queries, block_size)
    for k in want:
        assert torch.equal(s[k], want[k]), k


def test_seed_doc_shapes():
    gen = torch.Generator().manual_seed(0)
    s = make_state(16, 8, 16, 64, gen=gen)
    untouched = {k: v[8:].clone() for k, v in s.items() if k not in ("sampled_token_ids", "block_tables")}
    call(s, 16, 8, 16)
    for k, v in untouched.items():
        assert torch.equal(s[k][8:], v)  # rows num_queries.. are left alone


class Step(torch.nn.Module):
    def forward(self, input_tokens, sampled, positions, seq_lens, slots, block_tables):
        op(input_tokens, sampled, positions, seq_lens, slots, block_tables, 8, 5, 4)
        return seq_lens * 1


def _state():
    return make_state(8, 5, 4, 4, gen=torch.Generator().manual_seed(3))


def _args(s):
    return (s["input_tokens"], s["sampled_token_ids"], s["input_positions"], s["seq_lens"], s["slot_mapping"],
            s["block_tables"])


def test_compile_fullgraph_and_export_match_eager():
    eager, compiled, exported = _state(), _state(), _state()
    Step()(*_args(eager))
    torch.compile(Step(), fullgraph=True, backend="aot_eager")(*_args(compiled))
    bdim = torch.export.Dim("blocks", min=2, max=64)
    ep = torch.export.export(Step(), _args(_state()), dynamic_shapes=(None, None, None, None, None, {1: bdim}),
                             strict=False)
    ep.module()(*_args(exported))
    for k in eager:
        assert torch.equal(compiled[k], eager[k]) and torch.equal(exported[k], eager[k]), k


@pytest.mark.parametrize("change,match", [
    (dict(num_queries=8), r"num_seqs \(8\) must be greater than num_queries \(8\)"),
    (dict(num_queries=9), "must be greater than num_queries"),
    (dict(seq_lens=torch.ones(8, dtype=torch.int32)), "seq_lens has dtype"),
    (dict(input_tokens=torch.ones(7, dtype=torch.int64)), r"input_tokens has shape \(7,\)"),
    (dict(sampled_token_ids=torch.ones(5, 2, dtype=torch.int64)), r"sampled_token_ids has shape \(5, 2\)"),
    (dict(sampled_token_ids=torch.ones(5, 1, dtype=torch.int32)), "sampled_token_ids has dtype"),
    (dict(block_tables=torch.ones(8, 4, dtype=torch.int16)), "block_tables has dtype"),
    (dict(block_tables=torch.ones(7, 4, dtype=torch.int64)), "block_tables has shape"),
    (dict(block_tables=torch.ones(8, 1, dtype=torch.int64), seq_lens=torch.full((8,), 9)), "allocate the next block"),
    (dict(block_size=0), "pass positive integers"),
])
def test_checks(change, match):
    s = _state()
    params = dict(num_seqs=8, num_queries=5, block_size=4)
    for k, v in change.items():
        (params if k in params else s)[k] = v
    with pytest.raises(ValueError, match=match):
        call(s, params["num_seqs"], params["num_queries"], params["block_size"])
