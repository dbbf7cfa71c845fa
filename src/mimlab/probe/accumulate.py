"""Streaming float64 means with a Poisson bootstrap over images (memory independent of the number of images).

Each image contributes a vector of values (layers x heads x metrics). We keep the plain sum and, for R bootstrap
replicates, weighted sums with weights w_r ~ Poisson(1) drawn per image (Hanley & MacGibbon 2006; Chamandy et al. 2012:
"Estimating uncertainty for massive data streams"). Replicate r's mean is sum_i w_ri x_i / sum_i w_ri; the CI is the
percentile interval of those means. Weights come from a seeded generator consumed in image order, so results are
reproducible for a given seed and image order.
"""
from __future__ import annotations

import torch


class StreamingMean:
    def __init__(self, shape: tuple[int, ...], bootstrap: int = 200, seed: int = 0):
        self.shape = tuple(shape)
        self.sum = torch.zeros(self.shape, dtype=torch.float64)
        self.count = 0
        self.bootstrap = int(bootstrap)
        self.gen = torch.Generator().manual_seed(int(seed))
        if self.bootstrap > 0:
            self.boot_sum = torch.zeros((self.bootstrap,) + self.shape, dtype=torch.float64)
            self.boot_count = torch.zeros(self.bootstrap, dtype=torch.float64)

    def draw_weights(self, b: int) -> torch.Tensor:
        """Poisson(1) weights (b, R) for the next b images (share them across accumulators for coherent CIs)."""
        return torch.poisson(torch.ones(b, self.bootstrap, dtype=torch.float64), generator=self.gen)

    def update(self, values: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """values: (b, *shape), one row per image; weights: (b, R) bootstrap weights (drawn here if None)."""
        v = values.detach().to("cpu", torch.float64)
        if tuple(v.shape[1:]) != self.shape:
            raise ValueError(f"expected (b, {self.shape}), got {tuple(v.shape)}")
        b = v.shape[0]
        self.sum += v.sum(0)
        self.count += b
        if self.bootstrap > 0:
            w = self.draw_weights(b) if weights is None else weights.to(torch.float64)
            self.boot_sum += (w.T @ v.reshape(b, -1)).reshape(self.boot_sum.shape)
            self.boot_count += w.sum(0)

    def mean(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no images were accumulated")
        return self.sum / self.count

    def replicate_means(self) -> torch.Tensor | None:
        """(R, *shape) bootstrap replicate means (replicates that drew no image are dropped)."""
        if self.bootstrap == 0:
            return None
        ok = self.boot_count > 0
        bc = self.boot_count[ok].reshape((-1,) + (1,) * len(self.shape))
        return self.boot_sum[ok] / bc


def percentile_ci(replicates: torch.Tensor, level: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Percentile interval over dim 0."""
    a = (1.0 - level) / 2.0
    q = torch.tensor([a, 1.0 - a], dtype=replicates.dtype)
    lo, hi = torch.quantile(replicates, q, dim=0)
    return lo, hi
