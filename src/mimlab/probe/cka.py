"""Linear CKA with the unbiased HSIC estimator, accumulated over minibatches (Nguyen, Raghu & Kornblith 2021).

For a minibatch of n >= 4 samples with Gram matrices K = X X^T and L = Y Y^T, let K~, L~ be K, L with zeroed
diagonals. The unbiased HSIC estimator (Song et al. 2012) is
    HSIC_1(K, L) = [ tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1 ] / (n (n-3)).
Minibatch CKA sums it over batches: CKA = sum_b HSIC_1(K_b, L_b) / sqrt(sum_b HSIC_1(K_b, K_b) sum_b HSIC_1(L_b, L_b)).
Everything is float64. Results are not clamped: small negative values are legitimate for unrelated features.
"""
from __future__ import annotations

import torch


def gram_linear(x: torch.Tensor) -> torch.Tensor:
    """K = X X^T in float64 for features x of shape (n, ...) (flattened per sample)."""
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    return x @ x.T


def hsic1_matrix(grams: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC between every pair of a stack of Gram matrices (m, n, n) -> (m, m)."""
    m, n, _ = grams.shape
    if n < 4:
        raise ValueError(f"unbiased HSIC needs at least 4 samples per batch, got {n}")
    g = grams.to(torch.float64).clone()
    g.diagonal(dim1=1, dim2=2).zero_()
    flat = g.reshape(m, n * n)
    trace_term = flat @ flat.T                         # tr(K~ L~) for symmetric K~, L~
    sums = flat.sum(1)                                 # 1^T K~ 1
    rows = g.sum(2)                                    # K~ 1, (m, n)
    return (trace_term + torch.outer(sums, sums) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (rows @ rows.T)) / (n * (n - 3))


def cka_from_hsic(hsic: torch.Tensor) -> torch.Tensor:
    """CKA[i, j] = HSIC[i, j] / sqrt(HSIC[i, i] HSIC[j, j])."""
    d = torch.sqrt(torch.diagonal(hsic).clamp_min(0))
    return hsic / torch.outer(d, d)


class MinibatchCKA:
    """Accumulates unbiased HSIC between all pairs of m feature sets (e.g. every layer of every model)."""

    def __init__(self, num_sets: int):
        self.hsic = torch.zeros(num_sets, num_sets, dtype=torch.float64)
        self.num_batches = 0
        self.num_samples = 0
        self.skipped_samples = 0

    def update(self, grams: torch.Tensor) -> None:
        n = grams.shape[-1]
        if n < 4:  # the unbiased estimator is undefined; count and say so in the result
            self.skipped_samples += n
            return
        self.hsic += hsic1_matrix(grams).cpu()
        self.num_batches += 1
        self.num_samples += n

    def result(self) -> torch.Tensor:
        if self.num_batches == 0:
            raise ValueError("CKA needs at least one batch of 4 or more images")
        return cka_from_hsic(self.hsic)
