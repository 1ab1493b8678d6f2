"""The paged KV cache's bookkeeping: a fixed pool of blocks, ref counts and prefix caching.

Block ids index the KV pools the runner allocates, shape (num_blocks, block_size, ...). One block,
`scratch_block`, is never given to a sequence: padded batch rows write their KV there.
"""
from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass

from .sequence import Sequence


def chain_hash(token_ids: list[int], prev_hash: int | None) -> int:
    """Hash of a FULL block given the hash of the block before it (None for the first)."""
    h = hashlib.blake2b(digest_size=16)
    if prev_hash is not None:
        h.update(prev_hash.to_bytes(16, "little"))
    h.update(array("q", token_ids).tobytes())
    return int.from_bytes(h.digest(), "little")


def blocks_for_memory(num_bytes: int, bytes_per_block: int) -> int:
    """How many blocks fit in num_bytes of KV-cache memory (one of them becomes the scratch block)."""
    if bytes_per_block <= 0:
        raise ValueError(f"bytes_per_block must be > 0, got {bytes_per_block}")
    n = int(num_bytes) // bytes_per_block
    if n < 2:
        raise ValueError(f"kv_cache_memory={num_bytes} bytes holds {n} KV block(s) of {bytes_per_block} "
                         f"bytes; at least 2 are needed (one is the scratch block): raise kv_cache_memory")
    return n


@dataclass
class PrefixCacheStats:
    queried_blocks: int = 0  # full prompt blocks looked up in the cache
    hit_blocks: int = 0      # of those, found and reused


class Block:
    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.prev_hash: int | None = None
        self.token_ids: list[int] = []
        self.computed = False  # its KV is written, or is by the end of the step being scheduled

    def update(self, h: int, prev_hash: int | None, token_ids: list[int]) -> None:
        self.hash, self.prev_hash, self.token_ids = h, prev_hash, list(token_ids)

    def reset(self) -> None:
        self.ref_count = 1
        self.hash, self.prev_hash, self.token_ids = None, None, []
        self.computed = False


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (one is the scratch block), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.scratch_block = 0
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Insertion-ordered set: freed blocks go to the back, so cached prefixes live longest.
        self.free_block_ids: dict[int, None] = dict.fromkeys(range(1, num_blocks))
        self.hash_to_block_id: dict[int, int] = {}
        self.stats = PrefixCacheStats()

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def scratch_slot(self) -> int:
        return self.scratch_block * self.block_size

    def slot(self, seq: Sequence, position: int) -> int:
        """Flat index into the pool of the KV of token `position` of seq."""
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def slots(self, seq: Sequence, start: int, stop: int) -> list[int]:
        return [self.slot(seq, p) for p in range(start, stop)]

    def _take_free_block(self) -> int:
        block_id = next(iter(self.free_block_ids))
        del self.free_block_ids[block_id]
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block_id.get(block.hash) == block_id:
            del self.hash_to_block_id[block.hash]  # its old contents are about to be overwritten
        block.reset()
        return block_id

    def _cached_block(self, h: int, prev_hash: int | None, token_ids: list[int]) -> int | None:
        block_id = self.hash_to_block_id.get(h)
        if block_id is None:
            return None
        block = self.blocks[block_id]
        # A hash collision must never hand out KV computed for other tokens, and a block of a
        # prompt still being prefilled in chunks holds no KV yet.
        if block.token_ids != token_ids or block.prev_hash != prev_hash or not block.computed:
            return None
        return block_id

    def _register(self, block_id: int, h: int, prev_hash: int | None, token_ids: list[int]) -> None:
        self.blocks[block_id].update(h, prev_hash, token_ids)
        self.hash_to_block_id[h] = block_id

    def can_allocate(self, seq: Sequence) -> bool:
        return self.num_free_blocks >= seq.num_blocks(self.block_size)  # ignores hits: conservative

    def allocate(self, seq: Sequence) -> None:
        """Give seq blocks for all its tokens, reusing cached full blocks of its prefix."""
        assert not seq.block_table, f"{seq} already holds blocks"
        bs = self.block_size
        h = None
        cache_miss = not self.enable_prefix_caching
        seq.num_cached_tokens = 0
        for i in range(seq.num_blocks(bs)):
            token_ids = seq.block(i, bs)
            prev_hash, full = h, len(token_ids) == bs
            h = chain_hash(token_ids, prev_hash) if full and self.enable_prefix_caching else None
            # The last token is always recomputed, so the prefill has logits to sample from.
            block_id = None
            if not cache_miss and full and (i + 1) * bs < len(seq):
                self.stats.queried_blocks += 1
                block_id = self._cached_block(h, prev_hash, token_ids)
            cache_miss = block_id is None
            if cache_miss:
                block_id = self._take_free_block()
            else:
                self.stats.hit_blocks += 1
                seq.num_cached_tokens += bs
                if block_id in self.free_block_ids:  # cached but unused: revive it
                    del self.free_block_ids[block_id]
                self.blocks[block_id].ref_count += 1
            if h is not None:
                self._register(block_id, h, prev_hash, token_ids)
            seq.block_table.append(block_id)

    def mark_computed(self, seq: Sequence, start: int, stop: int) -> None:
        """seq's tokens [start, stop) are scheduled: the blocks they fill may serve prefix-cache
        hits from now on (a hit in the same step reads them after the step's KV writes)."""
        bs = self.block_size
        for i in range(start // bs, stop // bs):
            self.blocks[seq.block_table[i]].computed = True

    def deallocate(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):  # the tail goes back first, the prefix survives
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
        seq.num_cached_tokens = seq.num_computed_tokens = 0
        seq.block_table.clear()

    def can_append(self, seq: Sequence) -> bool:
        """Whether the next decode step (writing the KV of seq's last token) can get its block."""
        return self.num_free_blocks >= self._needs_block(seq)

    def _needs_block(self, seq: Sequence) -> bool:
        return len(seq) > len(seq.block_table) * self.block_size

    def may_append(self, seq: Sequence) -> None:
        """Before a decode step: give seq a block if its last token starts one; register the hash of
        the block that this step fills up."""
        bs, table = self.block_size, seq.block_table
        if self._needs_block(seq):
            table.append(self._take_free_block())
        if len(seq) % bs == 0 and self.enable_prefix_caching:
            n = len(seq) // bs
            prev_hash = self.blocks[table[n - 2]].hash if n >= 2 else None
            if n == 1 or prev_hash is not None:  # never register a block whose chain is broken
                token_ids = seq.block(n - 1, bs)
                self._register(table[n - 1], chain_hash(token_ids, prev_hash), prev_hash, token_ids)

    def check_all_free(self) -> None:
        """Raise if any block is still held (the invariant after every workload)."""
        held = [b.block_id for b in self.blocks if b.ref_count > 0 and b.block_id != self.scratch_block]
        missing = set(range(1, self.num_blocks)) - set(self.free_block_ids)
        if held or missing or self.scratch_block in self.free_block_ids:
            raise RuntimeError(f"KV blocks leaked: held={held[:16]} not free={sorted(missing)[:16]} "
                               f"(of {self.num_usable_blocks} usable)")
