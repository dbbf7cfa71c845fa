"""Keypoint metrics: object keypoint similarity (OKS) and COCO keypoint AP via pycocotools.

OKS between a ground truth with area s^2 (the annotation's `area`) and a prediction, over the labelled (v > 0)
ground-truth keypoints i with per-keypoint sigma k_i (Ronchi & Perona 2017; cocoapi `computeOks`):

    OKS = mean_i exp(-d_i^2 / (2 * s^2 * (2 k_i)^2)),     d_i = Euclidean distance of keypoint i.

AP = COCO's mean over OKS thresholds 0.50:0.05:0.95 of the 101-point interpolated precision, max 20 detections
per image (`COCOeval(iouType="keypoints")` with `kpt_oks_sigmas` set to the given sigmas).
"""
from __future__ import annotations

import contextlib
import copy
import io

import numpy as np

from mimlab.errors import MimlabError


def oks(gt: np.ndarray, area: float, pred: np.ndarray, sigmas: np.ndarray) -> float:
    """OKS of one prediction `pred` (K, 2 or 3) against one ground truth `gt` (K, 3: x, y, v)."""
    gt, pred, sigmas = np.asarray(gt, float), np.asarray(pred, float), np.asarray(sigmas, float)
    vis = gt[:, 2] > 0
    if not vis.any():
        raise MimlabError("oks: the ground truth has no labelled keypoint")
    d2 = ((pred[:, :2] - gt[:, :2]) ** 2).sum(1)
    e = d2 / ((2 * sigmas) ** 2) / (area + np.spacing(1)) / 2
    return float(np.exp(-e[vis]).mean())


def coco_keypoint_ap(gt_coco: dict, results: list[dict], sigmas: np.ndarray,
                     cat_ids: list[int] | None = None) -> dict[str, float]:
    """Evaluate `results` (COCO result dicts: image_id, category_id, keypoints [x, y, score]*K, score) against
    the ground-truth COCO dict with pycocotools (only `cat_ids`, if given).
    Returns `ap`, `ap50`, `ap75`, `ar` (COCO stats 0, 1, 2, 5)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    sigmas = np.asarray(sigmas, dtype=np.float64)
    if not results:
        return {"ap": 0.0, "ap50": 0.0, "ap75": 0.0, "ar": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(gt_coco)
        gt.createIndex()
        dt = gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(gt, dt, iouType="keypoints")
        ev.params.kpt_oks_sigmas = sigmas
        ev.params.imgIds = sorted(gt.getImgIds())
        if cat_ids is not None:
            ev.params.catIds = list(cat_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    s = ev.stats
    return {"ap": float(s[0]), "ap50": float(s[1]), "ap75": float(s[2]), "ar": float(s[5])}
