from collections import Counter

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from graphgen.runtime import block_manager as bm_mod
from graphgen.runtime.block_manager import BlockManager, blocks_for_memory
from graphgen.runtime.sequence import Sequence


def admit(bm, seq):
    """What the scheduler does for a whole prompt: its blocks, all of them computed in its step."""
    bm.allocate(seq)
    bm.mark_computed(seq, seq.num_cached_tokens, len(seq))


def decode_one(bm, seq, token):
    """What the scheduler does around one decode step: append the sampled token, make room."""
    seq.append_token(token)
    assert bm.can_append(seq)
    bm.may_append(seq)
    bm.mark_computed(seq, len(seq) - 1, len(seq))


def test_allocate_append_deallocate_ref_counts():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = Sequence(list(range(6)))
    assert bm.can_allocate(seq)
    admit(bm, seq)
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 5
    assert all(bm.blocks[b].ref_count == 1 for b in seq.block_table)
    decode_one(bm, seq, 6)
    decode_one(bm, seq, 7)  # len 8: block 1 is now full, no new block
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 5
    assert bm.blocks[seq.block_table[1]].hash is not None  # registered when it filled
    decode_one(bm, seq, 8)  # len 9: position 8 starts block 2
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 4
    assert bm.slot(seq, 8) == seq.block_table[2] * 4 + 0
    assert bm.slot(seq, 5) == seq.block_table[1] * 4 + 1
    bm.deallocate(seq)
    assert seq.block_table == [] and bm.num_free_blocks == 7
    bm.check_all_free()


def test_prefix_hits_share_blocks_and_are_counted():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = Sequence(list(range(10)))
    b = Sequence(list(range(8)) + [99, 98, 97])
    admit(bm, a)
    admit(bm, b)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert b.num_cached_tokens == 8 and a.num_cached_tokens == 0
    assert bm.stats.hit_blocks == 2
    assert [bm.blocks[x].ref_count for x in a.block_table] == [2, 2, 1]
    bm.deallocate(a)
    assert [bm.blocks[x].ref_count for x in b.block_table] == [1, 1, 1]
    bm.deallocate(b)
    bm.check_all_free()
    # freed blocks keep their contents: a new request with the prefix revives them
    c = Sequence(list(range(9)))
    admit(bm, c)
    assert c.num_cached_tokens == 8 and bm.stats.hit_blocks == 4
    bm.deallocate(c)
    bm.check_all_free()


def test_fully_cached_prompt_still_recomputes_last_token():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = Sequence(list(range(8))), Sequence(list(range(8)))
    admit(bm, a)
    admit(bm, b)
    assert b.num_cached_tokens == 4 < len(b)
    assert b.block_table[0] == a.block_table[0] and b.block_table[1] != a.block_table[1]


def test_decode_filled_block_is_reused_by_a_later_prompt():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = Sequence([1, 2, 3])
    admit(bm, a)
    for t in (4, 5, 6, 7, 8):  # fills block 0 and block 1 ([5, 6, 7, 8]) by decoding
        decode_one(bm, a, t)
    b = Sequence([1, 2, 3, 4, 5, 6, 7, 8, 9])
    admit(bm, b)
    assert b.block_table[:2] == a.block_table[:2] and b.num_cached_tokens == 8


def test_hash_collision_does_not_reuse_other_tokens(monkeypatch):
    monkeypatch.setattr(bm_mod, "chain_hash", lambda token_ids, prev_hash: 42)
    bm = BlockManager(num_blocks=16, block_size=4)
    a, b = Sequence([1, 2, 3, 4, 5]), Sequence([9, 9, 9, 9, 5])
    admit(bm, a)
    admit(bm, b)
    assert b.num_cached_tokens == 0 and bm.stats.hit_blocks == 0
    assert set(a.block_table).isdisjoint(b.block_table)
    c = Sequence([9, 9, 9, 9, 6])  # same tokens as b's first block: a true hit still works
    admit(bm, c)
    assert c.block_table[0] == b.block_table[0] and bm.stats.hit_blocks == 1


def test_prefix_caching_off_shares_nothing():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a, b = Sequence(list(range(9))), Sequence(list(range(9)))
    admit(bm, a)
    admit(bm, b)
    assert set(a.block_table).isdisjoint(b.block_table) and bm.stats.hit_blocks == 0


def test_blocks_serve_prefix_hits_only_once_computed():
    """A prompt prefilled in chunks registers its full blocks when admitted, before their KV exists:
    a later prompt with the same prefix (say after the first was preempted mid-prompt) must not
    reuse a block no step has computed."""
    bm = BlockManager(num_blocks=16, block_size=4)
    a = Sequence(list(range(12)))
    bm.allocate(a)
    bm.mark_computed(a, 0, 6)  # the first chunk: block 0 complete, block 1 half
    bm.deallocate(a)  # preempted
    b = Sequence(list(range(12)) + [50])
    bm.allocate(b)
    assert b.num_cached_tokens == 4 and bm.stats.hit_blocks == 1
    bm.mark_computed(b, 4, len(b))
    c = Sequence(list(range(12)) + [60])
    bm.allocate(c)
    assert c.num_cached_tokens == 12 and c.block_table[:3] == b.block_table[:3]


def test_pool_sizing_and_limits():
    per_block = 2 * 2 * 16 * 4 * 64 * 2  # K and V, 2 layers, 16 tokens, 4 heads, dim 64, fp16
    assert blocks_for_memory(10 * per_block + 5, per_block) == 10
    with pytest.raises(ValueError, match="kv_cache_memory"):
        blocks_for_memory(per_block, per_block)
    with pytest.raises(ValueError, match="scratch"):
        BlockManager(num_blocks=1, block_size=4)
    bm = BlockManager(num_blocks=3, block_size=4)
    assert not bm.can_allocate(Sequence(list(range(9))))  # 3 blocks needed, 2 usable


class BlockWorkload(RuleBasedStateMachine):
    """Random prompts from a tiny alphabet (so prefixes repeat), decode steps and frees."""

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(num_blocks=12, block_size=2)
        self.live: list[Sequence] = []

    @rule(tokens=st.lists(st.integers(0, 2), min_size=1, max_size=9))
    def add(self, tokens):
        seq = Sequence(tokens)
        if self.bm.can_allocate(seq):
            admit(self.bm, seq)
            self.live.append(seq)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100), token=st.integers(0, 2))
    def decode(self, i, token):
        seq = self.live[i % len(self.live)]
        seq.append_token(token)
        if self.bm.can_append(seq):
            self.bm.may_append(seq)
            self.bm.mark_computed(seq, len(seq) - 1, len(seq))
        else:
            seq.token_ids.pop()

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100))
    def free(self, i):
        self.bm.deallocate(self.live.pop(i % len(self.live)))

    @invariant()
    def books_balance(self):
        bm, bs = self.bm, self.bm.block_size
        refs = Counter(b for s in self.live for b in s.block_table)
        assert bm.scratch_block not in refs and bm.scratch_block not in bm.free_block_ids
        for block in bm.blocks[1:]:
            assert block.ref_count == refs[block.block_id]
            assert (block.block_id in bm.free_block_ids) == (block.ref_count == 0)
        for s in self.live:
            assert len(s.block_table) == s.num_blocks(bs)
            for i, b in enumerate(s.block_table):  # a shared or hashed block holds exactly our tokens
                if bm.blocks[b].hash is not None:
                    assert bm.blocks[b].token_ids == s.block(i, bs)

    def teardown(self):
        for s in self.live:
            self.bm.deallocate(s)
        self.bm.check_all_free()


TestBlockWorkload = BlockWorkload.TestCase
TestBlockWorkload.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
