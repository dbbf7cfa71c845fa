"""Monocular depth metrics (Eigen et al. 2014), on valid pixels, averaged per image then over images.

With g the ground truth and p the prediction (clipped to [min_depth, max_depth]) on the n valid pixels
(min_depth < g < max_depth, inside the evaluation crop):

    abs_rel  = mean(|p - g| / g)             sq_rel   = mean((p - g)^2 / g)
    rmse     = sqrt(mean((p - g)^2))          rmse_log = sqrt(mean((ln p - ln g)^2))
    log10    = mean(|log10 p - log10 g|)      deltaK   = mean(max(p / g, g / p) < 1.25^K),  K = 1, 2, 3
"""
from __future__ import annotations

import numpy as np

from mimlab.errors import MimlabError

METRIC_NAMES = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "delta1", "delta2", "delta3")


def valid_mask(gt: np.ndarray, min_depth: float, max_depth: float, crop: np.ndarray | None = None) -> np.ndarray:
    m = (gt > min_depth) & (gt < max_depth)
    return m & crop if crop is not None else m


def depth_metrics(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray, min_depth: float = 1e-3,
                  max_depth: float = 10.0) -> dict[str, float]:
    """The eight metrics of one image (see module docstring)."""
    pred, gt, mask = np.asarray(pred, np.float64), np.asarray(gt, np.float64), np.asarray(mask, bool)
    if pred.shape != gt.shape or gt.shape != mask.shape:
        raise MimlabError(f"depth_metrics: shapes differ: pred {pred.shape}, gt {gt.shape}, mask {mask.shape}")
    if not mask.any():
        raise MimlabError("depth_metrics: no valid ground-truth pixel")
    p = np.clip(pred[mask], min_depth, max_depth)
    g = gt[mask]
    if (g <= 0).any():
        raise MimlabError("depth_metrics: the mask admits non-positive ground truth")
    ratio = np.maximum(p / g, g / p)
    return {"abs_rel": float(np.mean(np.abs(p - g) / g)),
            "sq_rel": float(np.mean((p - g) ** 2 / g)),
            "rmse": float(np.sqrt(np.mean((p - g) ** 2))),
            "rmse_log": float(np.sqrt(np.mean((np.log(p) - np.log(g)) ** 2))),
            "log10": float(np.mean(np.abs(np.log10(p) - np.log10(g)))),
            "delta1": float(np.mean(ratio < 1.25)),
            "delta2": float(np.mean(ratio < 1.25 ** 2)),
            "delta3": float(np.mean(ratio < 1.25 ** 3))}


class DepthMeter:
    """Accumulates per-image metrics; `result()` is their mean over images."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self.skipped = 0          # images without a single valid ground-truth pixel (not scored)

    def update(self, pred: np.ndarray, gt: np.ndarray, mask: np.ndarray, **kw) -> None:
        if np.asarray(mask).any():
            self.rows.append(depth_metrics(pred, gt, mask, **kw))
        else:
            self.skipped += 1

    def result(self) -> dict[str, float]:
        if not self.rows:
            raise MimlabError("depth evaluation: no image had valid ground-truth pixels")
        return {k: float(np.mean([r[k] for r in self.rows])) for k in METRIC_NAMES}
