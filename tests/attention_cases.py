"""Attention logits like a trained network's, for exactness tests: peaked rows whose top probability lies in
0.5-0.99, logit spreads of 100-200, most keys a few to tens of nats below the top (not all at -inf), row offsets
of tens (as real q.k have); optionally with the row's maximum on its first patch key."""
from __future__ import annotations

import torch


def trained_like_logits(b: int, H: int, nq: int, P: int, K: int, *, top_first: bool = False,
                        seed: int = 0) -> torch.Tensor:
    """(b, H, nq, P + K) float64 logits (prefix keys first)."""
    g = torch.Generator().manual_seed(seed)
    N = P + K
    s = -(3 + 22 * torch.rand(b, H, nq, N, generator=g, dtype=torch.float64))
    top = torch.full((b, H, nq, 1), P) if top_first else torch.randint(P, N, (b, H, nq, 1), generator=g)
    runner_up = torch.randint(P, N, (b, H, nq, 3), generator=g)
    s.scatter_(-1, runner_up, -(0.2 + 3 * torch.rand(b, H, nq, 3, generator=g, dtype=torch.float64)))
    s.scatter_(-1, top, torch.zeros(b, H, nq, 1, dtype=torch.float64))
    s = s * (1 + 7 * torch.rand(b, H, nq, 1, generator=g, dtype=torch.float64))   # spreads ~25-200
    return s + 30 * torch.randn(b, H, nq, 1, generator=g, dtype=torch.float64)


def grid_dist(g: int, patch: int = 16) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], 1).double() * patch
    return torch.cdist(pos, pos)
