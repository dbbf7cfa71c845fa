"""One-pass evaluation (OPE) of single-object tracking, as in the OTB and LaSOT toolkits.

Boxes are (x, y, w, h) in continuous pixel coordinates; frames whose ground truth is invalid (NaN or w, h <= 0)
are not scored. Per sequence:

- success curve S(t) = fraction of frames with IoU > t, t = 0, 0.05, ..., 1 (21 thresholds); `suc` = mean of S
  (the area under the curve; a perfect tracker scores 20/21 because IoU > 1 never holds, as in the toolkits);
- precision P(t) = fraction of frames whose centre error <= t px, t = 0..50; `precision` = P(20);
- normalised precision (LaSOT, Fan et al. 2019): the centre error after dividing both centres by the ground-truth
  (w, h); N(t) = fraction <= t for t = 0, 0.01, ..., 0.5; `norm_precision` = mean of N (its AUC).
Dataset values are the means of the per-sequence values.
"""
from __future__ import annotations

import numpy as np

from mimlab.errors import MimlabError

SUCCESS_THRESHOLDS = np.linspace(0.0, 1.0, 21)
PRECISION_THRESHOLDS = np.arange(0, 51, dtype=np.float64)
NORM_PRECISION_THRESHOLDS = np.linspace(0.0, 0.5, 51)


def iou_xywh(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise IoU of (N, 4) x, y, w, h boxes."""
    a, b = np.atleast_2d(np.asarray(a, float)), np.atleast_2d(np.asarray(b, float))
    iw = np.clip(np.minimum(a[:, 0] + a[:, 2], b[:, 0] + b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, 1] + a[:, 3], b[:, 1] + b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih
    union = a[:, 2] * a[:, 3] + b[:, 2] * b[:, 3] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def centers(b: np.ndarray) -> np.ndarray:
    b = np.atleast_2d(np.asarray(b, float))
    return b[:, :2] + b[:, 2:] / 2


def sequence_scores(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """`suc`, `precision`, `norm_precision` of one sequence (see module docstring)."""
    pred, gt = np.asarray(pred, float), np.asarray(gt, float)
    if pred.shape != gt.shape or pred.ndim != 2 or pred.shape[1] != 4:
        raise MimlabError(f"tracking metrics: prediction {pred.shape} and ground truth {gt.shape} must be (N, 4)")
    valid = np.isfinite(gt).all(1) & (gt[:, 2] > 0) & (gt[:, 3] > 0)
    if not valid.any():
        raise MimlabError("tracking metrics: no frame has a valid ground-truth box")
    pred, gt = pred[valid], gt[valid]
    iou = iou_xywh(pred, gt)
    err = np.linalg.norm(centers(pred) - centers(gt), axis=1)
    nerr = np.linalg.norm((centers(pred) - centers(gt)) / gt[:, 2:], axis=1)
    success = (iou[:, None] > SUCCESS_THRESHOLDS[None]).mean(0)
    prec = (err[:, None] <= PRECISION_THRESHOLDS[None]).mean(0)
    nprec = (nerr[:, None] <= NORM_PRECISION_THRESHOLDS[None]).mean(0)
    return {"suc": float(success.mean()), "precision": float(prec[20]), "norm_precision": float(nprec.mean())}


def tracking_metrics(pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Mean over sequences of `sequence_scores(pred, gt)`; `pairs` = [(pred, gt), ...]."""
    if not pairs:
        raise MimlabError("tracking metrics: no sequences")
    rows = [sequence_scores(p, g) for p, g in pairs]
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
