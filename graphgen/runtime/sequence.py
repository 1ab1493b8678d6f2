"""One request as it moves through the runtime: its tokens, its KV blocks and its state."""
from __future__ import annotations

from enum import Enum, auto
from itertools import count

import torch

from .params import RequestOutput, SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """token_ids holds the prompt followed by the generated tokens. block_table[i] is the pool
    block that holds the KV of positions [i * block_size, (i + 1) * block_size).
    num_cached_tokens: how many leading tokens the last allocation found in the prefix cache
    (always a multiple of block_size, always < len(self), so the prefill computes at least one).
    num_computed_tokens: how many leading tokens have their KV in the pool, counting those of the
    step being scheduled; a running sequence decodes when only its last token lacks KV.
    """

    _ids = count()

    def __init__(self, token_ids: list[int], sampling_params: SamplingParams | None = None,
                 request_id: str | None = None, prompt: str | None = None):
        self.seq_id = next(Sequence._ids)
        self.request_id = str(self.seq_id) if request_id is None else request_id
        self.prompt = prompt
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.num_cached_tokens = 0
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.status = SequenceStatus.WAITING
        self.sampling_params = sampling_params or SamplingParams()
        seed = self.sampling_params.seed
        # Own generator: a seeded request draws the same tokens whatever else is in the batch.
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.finish_reason: str | None = None
        self.error: str | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    def num_blocks(self, block_size: int) -> int:
        """Blocks needed to hold the KV of every token so far."""
        return (len(self.token_ids) + block_size - 1) // block_size

    def block(self, i: int, block_size: int) -> list[int]:
        """The token ids that belong in block i (the last one may be partial)."""
        return self.token_ids[i * block_size:(i + 1) * block_size]

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(int(token_id))

    def output(self, text: str = "") -> RequestOutput:
        return RequestOutput(request_id=self.request_id, prompt=self.prompt,
                             prompt_token_ids=self.prompt_token_ids,
                             token_ids=self.completion_token_ids, text=text,
                             finish_reason=self.finish_reason, error=self.error)

    def __repr__(self) -> str:
        return (f"Sequence(request_id={self.request_id!r}, len={len(self)}, "
                f"prompt={self.num_prompt_tokens}, status={self.status.name})")
