"""Per-task options (torch-free, so the CLI can declare them without importing the tasks).

option name -> (type, default, help). Names are shared across tasks when they mean the same thing
(`num_deconv`, `head_channels`); on the command line they become `--option-name`.
"""
from __future__ import annotations

from typing import Any

from mimlab.errors import ConfigError

OptionSpec = dict[str, tuple[type, Any, str]]

CLASSIFY: OptionSpec = {
    "pool": (str, "mean", "classify: 'mean' (patch tokens) or 'cls' token features"),
    "crop_scale": (str, "0.8,1", "classify: area range LOW,HIGH of the training random-resized crop (as in "
                                 "pretrain; one number LOW is deprecated and means LOW,1)"),
    "hflip": (int, 1, "classify: random horizontal flips in training (1/0)"),
    "label_smoothing": (float, 0.0, "classify: label smoothing of the cross-entropy"),
}

KEYPOINTS: OptionSpec = {
    "flip_test": (int, 1, "keypoints: average with the mirrored crop at evaluation (1/0)"),
    "flip_pairs": (str, "", "keypoints: left/right index pairs 'I:J,...' (default: from left_/right_ names)"),
    "kpt_sigmas": (str, "", "keypoints: OKS sigmas, one value or one per keypoint (default: COCO's by name)"),
    "heatmap_sigma": (float, 2.0, "keypoints: Gaussian target sigma in heatmap pixels"),
    "num_deconv": (int, 2, "keypoints/depth: deconvolution layers in the head (each x2 resolution)"),
    "head_channels": (int, 64, "keypoints/depth/track: channels of the head's layers"),
    "box_scale": (float, 1.25, "keypoints: crop = box x this factor"),
    "rotation": (float, 30.0, "keypoints: max training rotation in degrees"),
    "scale_jitter": (float, 0.25, "keypoints: training crop scale range 1 +- this"),
}

DEPTH: OptionSpec = {
    "depth_format": (str, "nyu", "depth: 'nyu' (PNG in mm, max 10 m) or 'kitti' (PNG in 1/256 m, max 80 m)"),
    "depth_scale": (float, 0.0, "depth: PNG value per metre (default: 1000 nyu, 256 kitti)"),
    "max_depth": (float, 0.0, "depth: maximum depth in metres (default: 10 nyu, 80 kitti)"),
    "min_depth": (float, 1e-3, "depth: minimum valid depth in metres"),
    "eval_crop": (str, "", "depth: none | nyu_eigen | garg | eigen (default: nyu_eigen for nyu, garg for kitti)"),
    "train_split": (str, "", "depth: training split file (default DATA/train.txt)"),
    "val_split": (str, "", "depth: evaluation split file (default DATA/val.txt or DATA/test.txt)"),
    "silog_lambda": (float, 0.85, "depth: lambda of the SILog loss"),
    "num_deconv": (int, 2, "keypoints/depth: deconvolution layers in the head (each x2 resolution)"),
    "head_channels": (int, 64, "keypoints/depth/track: channels of the head's layers"),
}

TRACK: OptionSpec = {
    "template_factor": (float, 2.0, "track: template crop side = sqrt(w h) x this"),
    "search_factor": (float, 4.0, "track: search crop side = sqrt(w h) x this"),
    "template_size": (int, 0, "track: template input side in px (default: half the search size)"),
    "search_size": (int, 0, "track: search input side in px (default: the backbone's input size)"),
    "max_gap": (int, 30, "track: max frame distance between template and search frames in training"),
    "search_center_jitter": (float, 3.0, "track: search-centre jitter factor in training"),
    "search_scale_jitter": (float, 0.25, "track: search-size jitter (log-normal sigma) in training"),
    "pairs_per_sequence": (int, 100, "track: training pairs per sequence per epoch"),
    "head_channels": (int, 64, "keypoints/depth/track: channels of the head's layers"),
}

TASK_OPTIONS: dict[str, OptionSpec] = {"classify": CLASSIFY, "keypoints": KEYPOINTS, "depth": DEPTH,
                                       "track": TRACK}


def all_options() -> OptionSpec:
    """Every option of every task (first declaration wins for shared names)."""
    merged: OptionSpec = {}
    for spec in TASK_OPTIONS.values():
        for k, v in spec.items():
            merged.setdefault(k, v)
    return merged


def area_range(value: Any, name: str = "crop_scale") -> tuple[float, float]:
    """A crop's area range (LOW, HIGH), 0 < LOW <= HIGH <= 1, from "LOW,HIGH", a pair, or one number LOW
    (the older form: LOW,1)."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
    elif isinstance(value, (tuple, list)):
        parts = list(value)
    else:
        parts = [value]
    try:
        nums = [float(p) for p in parts]
    except (TypeError, ValueError):
        raise ConfigError(name, f"expected LOW,HIGH (e.g. 0.8,1), got {value!r}") from None
    if len(nums) == 1:
        nums.append(1.0)
    if len(nums) != 2 or not 0 < nums[0] <= nums[1] <= 1:
        raise ConfigError(name, f"must be LOW,HIGH with 0 < LOW <= HIGH <= 1, got {value!r}")
    return nums[0], nums[1]

