"""Plain data shared by the compiler side and the runtime: the paged KV-cache spec and the names of
the paged graphs' inputs. A leaf module (it imports nothing of graphgen), so the runtime can read an
artifact's ABI without importing the compiler."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class KVSpec:
    """The paged KV pool of one layer: two tensors (key, value) per layer.

    layout "BSH": (num_blocks, block_size, num_kv_heads * head_dim);
    layout "BNSD": (num_blocks, num_kv_heads, block_size, head_dim).
    head_dim is the stored (possibly zero-padded) head dim; model_head_dim the model's own.
    The runtime reserves one block (its `scratch_block`) for the writes of padded tokens.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    model_head_dim: int
    block_size: int
    layout: str
    dtype: str
    max_blocks_per_seq: int

    def pool_shape(self, num_blocks: int) -> tuple[int, ...]:
        if self.layout == "BSH":
            return (num_blocks, self.block_size, self.num_kv_heads * self.head_dim)
        return (num_blocks, self.num_kv_heads, self.block_size, self.head_dim)

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block takes across all layers, keys and values."""
        elem = torch.empty((), dtype=DTYPES[self.dtype]).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "KVSpec":
        return cls(**d)


def cache_input_names(num_layers: int) -> list[str]:
    """Names of the pool inputs, in graph order: key_cache_0, value_cache_0, key_cache_1, ..."""
    return [f"{kind}_cache_{i}" for i in range(num_layers) for kind in ("key", "value")]


# The inputs of each phase's graph, before the pools (see passes/paged_attention.py for meanings):
#   input_ids, position_ids  int64: prefill/extend/mixed (1, T) packed tokens; decode (B, 1)
#   logits_indices           int64 (K,): the packed rows whose logits come out (a sequence's last
#                            token; in mixed, only sequences whose prompt this step completes, and
#                            decode rows)
#   cu_seq_lens              int64 (B,): cumulative ends of the packed sequences (no leading 0)
#   block_table              int32 (B, max_blocks_per_seq): pool blocks of each sequence
#   seq_lens                 int64 (B,): KV length of each sequence, the new token(s) included
#   slot_mapping             int64 (T,) or (B,): block * block_size + offset where each new K/V goes
PHASE_INPUTS = {
    "prefill": ["input_ids", "position_ids", "logits_indices", "cu_seq_lens", "slot_mapping"],
    "extend": ["input_ids", "position_ids", "logits_indices", "block_table", "seq_lens", "slot_mapping"],
    "mixed": ["input_ids", "position_ids", "logits_indices", "cu_seq_lens", "block_table", "seq_lens",
              "slot_mapping"],
    "decode": ["input_ids", "position_ids", "block_table", "seq_lens", "slot_mapping"],
}
# The graphs a cpu/cuda build compiles. mixed (any number of sequences, each with any number of new
# tokens over its paged prefix: chunked prefill beside decode rows, prefix-cache hits) covers what
# extend does, so extend is built only for the NPU, where mixed is not (backends/torchair.py).
CPU_PHASES = ("prefill", "mixed", "decode")
