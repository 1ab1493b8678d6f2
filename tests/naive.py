"""An independent, deliberately naive attention: per batch and per head, masks built element by
element from first principles, float64 throughout. Tests compare every graphgen op with it; it
shares no code with graphgen.ops."""
from __future__ import annotations

import math
from typing import Callable

import torch

# allowed(b, h, i, j) -> bool: may query i of head h in batch b see key j?
Allowed = Callable[[int, int, int, int], bool]


def explicit_mask(b: int, n: int, sq: int, skv: int, allowed: Allowed) -> torch.Tensor:
    """bool (B, N, Sq, Skv), True where `allowed` says the key is visible."""
    return torch.tensor(
        [[[[bool(allowed(bi, h, i, j)) for j in range(skv)] for i in range(sq)] for h in range(n)] for bi in range(b)],
        dtype=torch.bool,
    ).reshape(b, n, sq, skv)


def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    allowed: Allowed | torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    sink: torch.Tensor | None = None,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, N, Sq, D), k/v (B, Nkv, Skv, D). bias is added to the scaled logits, broadcastable to
    (B, N, Sq, Skv). Returns out (B, N, Sq, D) and lse (B, N, Sq), float64; rows with nothing
    visible give out = 0 and lse = -inf (or the sink logit)."""
    b, n, sq, d = q.shape
    nkv, skv = k.shape[1], k.shape[2]
    group = n // nkv
    if allowed is None:
        mask = torch.ones(b, n, sq, skv, dtype=torch.bool)
    elif callable(allowed):
        mask = explicit_mask(b, n, sq, skv, allowed)
    else:
        mask = allowed.expand(b, n, sq, skv)
    out = torch.zeros(b, n, sq, v.shape[-1], dtype=torch.float64)
    lse = torch.full((b, n, sq), -math.inf, dtype=torch.float64)
    for bi in range(b):
        for h in range(n):
            kh = h // group
            s = q[bi, h].double() @ k[bi, kh].double().T * scale
            if softcap > 0:
                s = softcap * torch.tanh(s / softcap)
            if bias is not None:
                s = s + bias.double().expand(b, n, sq, skv)[bi, h]
            s = s.masked_fill(~mask[bi, h], -math.inf)
            if sink is not None:
                s = torch.cat([s, sink.double()[h].expand(sq, 1)], dim=1)
            row_lse = torch.logsumexp(s, dim=1)
            p = torch.exp(s - row_lse[:, None]).nan_to_num(0.0)
            if sink is not None:
                p = p[:, :-1]
            out[bi, h] = p @ v[bi, kh].double()
            lse[bi, h] = row_lse
    return out, lse
