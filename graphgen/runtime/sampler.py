"""Logits to next tokens: greedy, temperature, top-k, top-p, per-request seeds; stop strings."""
from __future__ import annotations

import torch

from .sequence import Sequence


class Sampler:
    """Picks one token per sequence from logits (B, V) fp32, B >= len(seqs); rows past len(seqs)
    are padding and ignored. Returns int64 token ids (len(seqs),) on the logits' device.

    Greedy (temperature 0) is argmax, ties to the lowest id. Otherwise the distribution is
    softmax(logits / temperature) cut to the top_k tokens, then to the top_p nucleus (at least one
    token kept), and sampled by the exponential race argmax(p / q), q ~ Exp(1). A seeded request
    draws q from its own generator on the CPU, so its tokens do not depend on the batch around it
    or on the device; unseeded rows share `generator` (None: torch's default for the device).
    """

    greedy_is_argmax = True  # a greedy row's token is its logits' argmax: the runtime may find it without them

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        if logits.dim() != 2 or logits.shape[0] < len(seqs):
            raise ValueError(f"logits must be (B >= {len(seqs)}, vocab), got {tuple(logits.shape)}")
        logits = logits[:len(seqs)].float()
        params = [s.sampling_params for s in seqs]
        tokens = first_argmax(logits)
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if rows:
            sampled = self._sample(logits[rows], [params[i] for i in rows], [seqs[i].generator for i in rows])
            tokens[rows] = sampled
        return tokens

    def _sample(self, logits, params, generators) -> torch.Tensor:
        device = logits.device
        temperature = torch.tensor([p.temperature for p in params], device=device)
        probs = nucleus_probs(logits / temperature[:, None],
                              torch.tensor([p.top_k for p in params], device=device),
                              torch.tensor([p.top_p for p in params], device=device))
        noise = torch.empty_like(probs)
        unseeded = [i for i, g in enumerate(generators) if g is None]
        if unseeded:
            noise[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=device).exponential_(
                generator=self.generator)
        for i, g in enumerate(generators):
            if g is not None:
                noise[i] = torch.empty(probs.shape[1]).exponential_(generator=g).to(device)
        # q == 0 would turn a zero-probability token into 0/0; the floor keeps p/q finite.
        return first_argmax(probs.div_(noise.clamp_(min=torch.finfo(noise.dtype).tiny)))


ARGMAX_CHUNK = 128
ARGMAX_CHUNKED_FROM = 1 << 17  # elements: below, ATen's argmax is as fast (batch 1 at 32K ids: 28 vs 24 us)


def first_argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(dim=-1) of a (B, V) tensor: the same indices (lowest on ties, the first NaN where a
    row has one). ATen's CPU argmax scans a row one element at a time: ~0.25-0.4 ms for 16 x 32000
    logits here, 1.6 ms at 64 rows, while amax is vectorized; from ARGMAX_CHUNKED_FROM elements on
    the CPU `chunked_argmax` takes it (~64 us at 16 rows). Small logits keep argmax, whose one
    call beats chunked_argmax's few (a tiny model's decode step is ~0.2 ms)."""
    if x.device.type != "cpu" or x.numel() < ARGMAX_CHUNKED_FROM or x.shape[-1] < 2 * ARGMAX_CHUNK:
        return x.argmax(dim=-1)
    return chunked_argmax(x)


def chunked_argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(dim=-1) for (B, V >= 2 ARGMAX_CHUNK): the row's maximum per chunk of ARGMAX_CHUNK
    (amax), argmax over those picks the first chunk holding it, and argmax within that chunk's
    window gives the index."""
    B, V = x.shape
    c = ARGMAX_CHUNK
    n = V // c
    peaks = x[:, :n * c].reshape(B, n, c).amax(dim=-1)
    if n * c < V:
        peaks = torch.cat([peaks, x[:, n * c:].amax(dim=-1, keepdim=True)], dim=1)
    # A window of c from the chunk's start, moved back to end at V for the last, shorter chunk: any
    # element before that chunk equal to the maximum would have made an earlier chunk the first.
    start = (peaks.argmax(dim=-1) * c).clamp_(max=V - c)
    window = x.gather(1, start[:, None] + torch.arange(c, device=x.device))
    return start + window.argmax(dim=-1)


def nucleus_probs(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Unnormalized probabilities (B, V) with everything outside each row's top_k (0 = all) and
    then top_p nucleus set to 0. The nucleus is the smallest set of most likely tokens whose mass
    reaches top_p; the most likely token is always in it."""
    if not bool((top_k > 0).any()) and not bool((top_p < 1).any()):
        return logits.softmax(dim=-1)
    vocab = logits.shape[-1]
    # stable: among equal logits the lowest id ranks first, as in greedy argmax
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(vocab, device=logits.device)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    sorted_logits.masked_fill_(rank[None, :] >= k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    probs.masked_fill_((mass_before >= top_p[:, None]) & (top_p[:, None] < 1), 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, probs)


def stop_string_hit(text: str, stops: tuple[str, ...] | list[str], start: int = 0) -> int | None:
    """Index in text where the earliest stop string begins, or None. Only matches that end at or
    after `start` are looked for (the text before it was checked on earlier steps)."""
    hits = [text.find(s, max(0, start - len(s) + 1)) for s in stops]
    hits = [h for h in hits if h >= 0]
    return min(hits) if hits else None
