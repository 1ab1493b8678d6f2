"""What a user asks of one request (SamplingParams) and what it gets back (RequestOutput)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """vLLM-style sampling knobs for one request; checked on construction.

    temperature 0 means greedy. top_k 0 (or -1, vLLM's spelling) keeps every token; top_p 1.0
    keeps the whole distribution. `stop` strings are matched on the detokenized text by the engine;
    `stop_token_ids` and EOS (unless `ignore_eos`) end generation in the scheduler.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: str | list[str] | tuple[str, ...] | None = None
    stop_token_ids: list[int] | tuple[int, ...] | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0.0:  # also rejects NaN
            raise ValueError(f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k must be an int >= 0 (0 or -1 = off), got {self.top_k!r}")
        if self.top_k == -1:
            self.top_k = 0
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"SamplingParams.seed must be an int or None, got {self.seed!r}")
        self.stop = _stop_strings(self.stop)
        self.stop_token_ids = _stop_token_ids(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _stop_strings(stop) -> tuple[str, ...]:
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    for s in stops:
        if not isinstance(s, str) or not s:
            raise ValueError(f"SamplingParams.stop must hold non-empty strings, got {s!r}")
    return stops


def _stop_token_ids(ids) -> tuple[int, ...]:
    ids = tuple(ids or ())
    for t in ids:
        if not isinstance(t, int) or t < 0:
            raise ValueError(f"SamplingParams.stop_token_ids must hold token ids (ints >= 0), got {t!r}")
    return ids


@dataclass
class RequestOutput:
    """The result of one request. `token_ids` are the generated tokens only; `error` says why a
    request was refused or cut short (finish_reason "abort"), or is None."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "abort"; None while still running
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
