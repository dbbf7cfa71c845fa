"""Transfer metrics against hand-worked cases."""
from __future__ import annotations

import math

import numpy as np
import pytest

from mimlab.errors import MimlabError
from mimlab.transfer.metrics.classification import classification_metrics, majority_baseline
from mimlab.transfer.metrics.depth import DepthMeter, depth_metrics
from mimlab.transfer.metrics.keypoints import coco_keypoint_ap, oks
from mimlab.transfer.metrics.tracking import iou_xywh, sequence_scores, tracking_metrics


# ------------------------------------------------------------------------------------------------ classification
def test_classification_accuracy_and_mean_per_class():
    pred = np.array([0, 0, 1, 1, 2, 0])
    target = np.array([0, 0, 0, 1, 2, 2])
    m = classification_metrics(pred, target, 3)
    assert m["top1"] == pytest.approx(4 / 6)
    # per class: c0 2/3, c1 1/1, c2 1/2
    assert m["mean_class_acc"] == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)


def test_majority_baseline():
    m = majority_baseline(np.array([0, 1, 1, 2]), np.array([0, 0, 0, 1, 2, 2]), 3)
    assert m["top1"] == pytest.approx(1 / 6)
    assert m["mean_class_acc"] == pytest.approx(1 / 3)


def test_classification_rejects_bad_labels():
    with pytest.raises(MimlabError):
        classification_metrics(np.array([0]), np.array([3]), 3)


# ----------------------------------------------------------------------------------------------------- keypoints
def _coco(instances):
    """One image per instance list entry; instances: list of (image_id, keypoints (K,3), area)."""
    k = len(instances[0][1])
    images = [{"id": i, "file_name": f"{i}.png", "width": 100, "height": 100} for i in {x[0] for x in instances}]
    anns = [{"id": j + 1, "image_id": img, "category_id": 1, "iscrowd": 0, "area": area,
             "bbox": [0, 0, 100, 100], "num_keypoints": int((np.asarray(kp)[:, 2] > 0).sum()),
             "keypoints": [float(v) for v in np.asarray(kp).ravel()]} for j, (img, kp, area) in enumerate(instances)]
    cats = [{"id": 1, "name": "p", "keypoints": [f"k{i}" for i in range(k)], "skeleton": []}]
    return {"images": images, "annotations": anns, "categories": cats}


GT_KP = np.array([[10, 10, 2], [20, 20, 2], [30, 10, 2]], float)
SIGMAS = np.array([0.1, 0.1, 0.1])


def _result(image_id, kp, dx=0.0, score=1.0):
    pred = np.asarray(kp, float).copy()
    pred[:, 0] += dx
    pred[:, 2] = 1.0
    return {"image_id": image_id, "category_id": 1, "keypoints": pred.ravel().tolist(), "score": score}


def test_oks_by_hand():
    # d^2 = 100 for every keypoint, area 10000, k = 0.1: e = 100 / (2 * 10000 * 0.2^2) = 0.125
    assert oks(GT_KP, 10000.0, GT_KP[:, :2] + [10, 0], SIGMAS) == pytest.approx(math.exp(-0.125), rel=1e-9)
    # unlabelled keypoints do not count
    gt = GT_KP.copy()
    gt[2, 2] = 0
    pred = GT_KP[:, :2].copy()
    pred[2] += 50
    assert oks(gt, 10000.0, pred, SIGMAS) == pytest.approx(1.0)


def test_perfect_keypoints_give_ap_one():
    coco = _coco([(1, GT_KP, 10000.0), (2, GT_KP + [5, 5, 0], 5000.0)])
    res = [_result(1, GT_KP), _result(2, GT_KP + [5, 5, 0])]
    m = coco_keypoint_ap(coco, res, SIGMAS)
    assert m["ap"] == pytest.approx(1.0) and m["ap50"] == pytest.approx(1.0) and m["ap75"] == pytest.approx(1.0)


def test_known_offset_gives_hand_computed_ap():
    # one instance, OKS = exp(-0.125) = 0.8825: matched at thresholds 0.50..0.85 (8 of 10) -> AP 0.8
    coco = _coco([(1, GT_KP, 10000.0)])
    m = coco_keypoint_ap(coco, [_result(1, GT_KP, dx=10.0)], SIGMAS)
    assert m["ap"] == pytest.approx(0.8)
    assert m["ap50"] == pytest.approx(1.0) and m["ap75"] == pytest.approx(1.0)
    # two instances: a perfect one (score 0.9) and the offset one (score 0.8). At thresholds <= 0.85 both match
    # (AP 1); at 0.90 and 0.95 only the first: precision 1 up to recall 0.5 -> 51 of COCO's 101 recall points.
    coco = _coco([(1, GT_KP, 10000.0), (2, GT_KP, 10000.0)])
    res = [_result(1, GT_KP, score=0.9), _result(2, GT_KP, dx=10.0, score=0.8)]
    m = coco_keypoint_ap(coco, res, SIGMAS)
    assert m["ap"] == pytest.approx((8 * 1.0 + 2 * 51 / 101) / 10)


def test_keypoint_ap_no_results_is_zero():
    assert coco_keypoint_ap(_coco([(1, GT_KP, 100.0)]), [], SIGMAS)["ap"] == 0.0


# --------------------------------------------------------------------------------------------------------- depth
def test_depth_metrics_by_hand():
    gt = np.array([[1.0, 2.0], [4.0, 0.0]])
    pred = np.array([[1.0, 1.0], [6.0, 3.0]])
    mask = gt > 0  # valid: (g, p) = (1, 1), (2, 1), (4, 6)
    m = depth_metrics(pred, gt, mask, max_depth=10.0)
    assert m["abs_rel"] == pytest.approx((0 + 1 / 2 + 2 / 4) / 3)
    assert m["sq_rel"] == pytest.approx((0 + 1 / 2 + 4 / 4) / 3)
    assert m["rmse"] == pytest.approx(math.sqrt((0 + 1 + 4) / 3))
    assert m["rmse_log"] == pytest.approx(math.sqrt((0 + math.log(2) ** 2 + math.log(1.5) ** 2) / 3))
    assert m["log10"] == pytest.approx((0 + math.log10(2) + math.log10(1.5)) / 3)
    # ratios max(p/g, g/p) = 1, 2, 1.5 against 1.25, 1.5625, 1.953125
    assert (m["delta1"], m["delta2"], m["delta3"]) == pytest.approx((1 / 3, 2 / 3, 2 / 3))


def test_depth_prediction_is_clipped_and_meter_averages_images():
    gt = np.array([[2.0, 2.0]])
    m = depth_metrics(np.array([[0.0, 50.0]]), gt, np.ones_like(gt, bool), min_depth=1.0, max_depth=4.0)
    assert m["rmse"] == pytest.approx(math.sqrt((1 + 4) / 2))  # clipped to 1 and 4
    meter = DepthMeter()
    meter.update(np.array([[1.0]]), np.array([[1.0]]), np.array([[True]]))
    meter.update(np.array([[3.0]]), np.array([[1.0]]), np.array([[True]]))
    meter.update(np.array([[3.0]]), np.array([[0.0]]), np.array([[False]]))  # no valid pixel: skipped
    assert meter.result()["abs_rel"] == pytest.approx((0 + 2) / 2)


def test_depth_metrics_refuse_empty_mask():
    with pytest.raises(MimlabError):
        depth_metrics(np.ones((2, 2)), np.ones((2, 2)), np.zeros((2, 2), bool))


# ------------------------------------------------------------------------------------------------------ tracking
GT = np.array([[0, 0, 10, 10]] * 4, float)
PRED = np.array([[0, 0, 10, 10],      # IoU 1, centre error 0
                 [0, 0, 10, 6.1],     # IoU 0.61, error 1.95 px, normalised 0.195
                 [0, 0, 10, 3.3],     # IoU 0.33, error 3.35 px, normalised 0.335
                 [20, 20, 10, 10]])   # IoU 0, error 28.28 px


def test_iou():
    assert iou_xywh(PRED, GT) == pytest.approx([1.0, 0.61, 0.33, 0.0])
    assert iou_xywh([[0, 0, 2, 2]], [[1, 1, 2, 2]]) == pytest.approx([1 / 7])


def test_success_precision_by_hand():
    s = sequence_scores(PRED, GT)
    # success counts over t = 0, .05, ..., 1: t=0 -> 3; .05-.30 (6) -> 3; .35-.60 (6) -> 2; .65-.95 (7) -> 1; 1 -> 0
    assert s["suc"] == pytest.approx((3 + 6 * 3 + 6 * 2 + 7 * 1) / (4 * 21))
    assert s["precision"] == pytest.approx(3 / 4)
    # normalised errors 0, .195, .335, 2.83 over t = 0, .01, ..., .5: 51 + 31 + 17 + 0 thresholds passed
    assert s["norm_precision"] == pytest.approx((51 + 31 + 17) / (4 * 51))


def test_invalid_frames_skipped_and_sequences_averaged():
    gt = np.vstack([GT, [[np.nan, np.nan, np.nan, np.nan]], [[0, 0, 0, 5]]])
    pred = np.vstack([PRED, [[0, 0, 10, 10]], [[0, 0, 10, 10]]])
    assert sequence_scores(pred, gt) == pytest.approx(sequence_scores(PRED, GT))
    perfect = sequence_scores(GT, GT)
    assert perfect["suc"] == pytest.approx(20 / 21)  # IoU 1 fails only "IoU > 1"
    both = tracking_metrics([(PRED, GT), (GT, GT)])
    assert both["precision"] == pytest.approx((3 / 4 + 1) / 2)


def test_depth_meter_counts_images_without_valid_pixels():
    """An evaluation image with no valid ground-truth pixel is not scored, and the count says so."""
    import numpy as np

    from mimlab.transfer.metrics.depth import DepthMeter

    meter = DepthMeter()
    gt = np.full((4, 4), 2.0)
    meter.update(np.full((4, 4), 2.0), gt, np.ones((4, 4), bool), min_depth=0.1, max_depth=10.0)
    meter.update(np.full((4, 4), 5.0), gt, np.zeros((4, 4), bool), min_depth=0.1, max_depth=10.0)
    r = meter.result()
    assert len(meter.rows) == 1 and meter.skipped == 1
    assert r["rmse"] == 0.0                      # the skipped image's wrong prediction did not enter the mean
