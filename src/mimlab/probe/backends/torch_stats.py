"""The torch statistics path: the definition (`chunk_sums_tensors`) run chunk by chunk, eager or compiled, and the
CKA feature Gram in torch."""
from __future__ import annotations

import torch

from mimlab.probe.attention_stats import ChunkSums, attention_logits, chunk_sums_tensors

# centred features whose norm is below this fraction of the raw features' are rounding noise: the set has no
# variance (float32 features are centred in float32, whose rounding noise is ~1e-7 of the offset)
ZERO_VARIANCE_RTOL = {torch.float64: 1e-12, torch.float32: 1e-6}

_COMPILED = None


def compiled_chunk_sums():
    """`chunk_sums_tensors` compiled by torch.compile (one graph per chunk shape; compiled on first use)."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(chunk_sums_tensors, dynamic=False)
    return _COMPILED


def window_dist_rows(dist: torch.Tensor, b0: int, b1: int, num_windows: int) -> torch.Tensor:
    """(b1 - b0, 1, N, N) distance rows of attention-batch items b0..b1-1, item b being window b % num_windows."""
    win = torch.arange(b0, b1, device=dist.device) % num_windows
    return dist[win][:, None]


def chunked_sums(fn, *, q: torch.Tensor | None = None, k: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None, scale: float = 1.0, is_causal: bool = False,
                 logits: torch.Tensor | None = None, num_prefix: int, dist: torch.Tensor, num_windows: int,
                 dtype: torch.dtype, eps: float, renormalize: bool, js: bool, chunk_elements: int) -> ChunkSums:
    """The statistics of the patch queries of a whole attention batch, `fn` (a `chunk_sums_tensors`) applied to
    chunks of logits of at most `chunk_elements` elements: formed from (q, k, mask) as SDPA would, or sliced from
    captured `logits`. `dist` is (K, K) for global attention or (W, N, N) per window (item b = window b % W)."""
    sdpa = logits is None
    src = q if sdpa else logits
    B, H, N, _ = src.shape
    P = num_prefix
    if sdpa:
        if mask is not None:
            while mask.dim() < 4:
                mask = mask.unsqueeze(0)
        qd, kd = q.to(dtype), k.to(dtype)
    dist = dist.to(dtype)
    nq_total = N - P
    per_image = H * nq_total * N
    b_chunk = max(1, chunk_elements // max(per_image, 1))
    q_chunk = nq_total if b_chunk > 1 or per_image <= chunk_elements else max(1, chunk_elements // (H * N))
    total: ChunkSums | None = None
    for b0 in range(0, B, b_chunk):
        b1 = min(B, b0 + b_chunk)
        sums: ChunkSums | None = None
        win_rows = window_dist_rows(dist, b0, b1, num_windows) if num_windows > 1 else None
        for q0 in range(P, N, q_chunk):
            q1 = min(N, q0 + q_chunk)
            if sdpa:
                m = None
                if mask is not None:
                    m = mask[b0:b1] if mask.shape[0] == B else mask
                    m = m[..., q0:q1, :]
                chunk = attention_logits(qd[b0:b1, :, q0:q1], kd[b0:b1], m, scale, is_causal, q0)
            else:
                chunk = logits[b0:b1, :, q0:q1].to(dtype)
            rows = dist[q0 - P:q1 - P] if win_rows is None else win_rows[:, :, q0:q1, :]
            part = fn(chunk, rows, P, eps, renormalize, js)
            if sums is None:
                sums = part
            else:
                sums += part
        assert sums is not None
        total = sums if total is None else total.cat(sums)
    assert total is not None
    return total


def feature_gram(feats: torch.Tensor, kernel=None) -> torch.Tensor:
    """The linear Gram matrix (float64) of one batch's CKA features (n, ...), after subtracting the batch mean.

    The unbiased HSIC is exactly invariant to adding one vector to every sample, so centring changes nothing
    mathematically; it keeps float64 precision when features have a large common offset (residual streams do),
    where `X X^T` would bury the between-image differences under the offset's square. By the same invariance the
    mean need not be exact: float32 features are centred in float32 (no float64 copy of the raw features), and
    only the centred values, exact to float32 rounding of themselves, are multiplied in float64. Features identical
    for every image of the batch give an all-zero Gram: their HSIC is exactly 0, so CKA with them is 0/0 = NaN
    (undefined) rather than a ratio of rounding errors. Non-finite features give a non-finite Gram.

    `kernel`, if given, computes (G, squared-mean sum) for float32 CPU features in one pass (the C kernel's
    `feature_gram_parts`)."""
    x = feats.reshape(feats.shape[0], -1)
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    if kernel is not None and x.dtype == torch.float32 and x.device.type == "cpu":
        g, musq = kernel(x)
    else:
        mu = x.mean(0, keepdim=True)
        xc = (x - mu).to(torch.float64)
        g = xc @ xc.T
        musq = mu.to(torch.float64).square().sum()
    # ||x||^2 = ||x - mu||^2 + n ||mu||^2: the zero-variance test costs no extra pass over the features
    centred = g.diagonal().sum()
    total = centred + x.shape[0] * musq
    if bool(centred <= ZERO_VARIANCE_RTOL[x.dtype] ** 2 * total):     # also False for NaN: then g is returned
        return torch.zeros_like(g)
    return g
