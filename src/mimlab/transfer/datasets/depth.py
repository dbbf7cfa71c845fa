"""Depth datasets: split files of `rgb depth [focal]` lines (NYUv2 / KITTI as used by BTS and the
Monocular-Depth-Estimation-Toolbox), 16-bit depth PNGs, and the standard evaluation crops.

- NYUv2: depth PNG in millimetres (`scale` 1000), max depth 10 m; Eigen crop rows 45:471, cols 41:601 of 480x640.
- KITTI: depth PNG in 1/256 m (`scale` 256), 0 = no LiDAR point, max depth 80 m; Garg crop (Garg et al. 2016)
  rows 0.40810811-0.99189189 x H, cols 0.03594771-0.96405229 x W; Eigen crop rows 0.3324324-0.91351351 x H, same cols.
Crops are applied as fractions of the ground-truth size, so they also work on resized data.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mimlab.errors import ConfigError, MimlabError
from mimlab.transfer.datasets.common import read_text

FORMATS = {"nyu": {"scale": 1000.0, "max_depth": 10.0, "min_depth": 1e-3},
           "kitti": {"scale": 256.0, "max_depth": 80.0, "min_depth": 1e-3}}

# crop name -> (top, bottom, left, right) as fractions of (H, W)
CROPS = {"none": (0.0, 1.0, 0.0, 1.0),
         "nyu_eigen": (45 / 480, 471 / 480, 41 / 640, 601 / 640),
         "garg": (0.40810811, 0.99189189, 0.03594771, 0.96405229),
         "eigen": (0.3324324, 0.91351351, 0.03594771, 0.96405229)}


@dataclass
class DepthSample:
    rgb: Path
    depth: Path | None  # None: the split file says "None" (no ground truth), skipped
    focal: float | None


def read_split_file(path: str | Path, root: str | Path, check_files: bool = True) -> list[DepthSample]:
    """Parse a split file; paths are relative to `root` (a leading '/' is stripped, as in the BTS files)."""
    path, root = Path(path), Path(root)
    if not path.is_file():
        raise MimlabError(f"depth split file not found: {path}")
    samples = []
    for lineno, line in enumerate(read_text(path, "depth split file").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) not in (2, 3):
            raise MimlabError(f"{path}:{lineno}: expected 'rgb_path depth_path [focal]', got {len(fields)} fields")
        focal = None
        if len(fields) == 3:
            try:
                focal = float(fields[2])
            except ValueError:
                raise MimlabError(f"{path}:{lineno}: focal '{fields[2]}' is not a number") from None
        rgb = root / fields[0].lstrip("/")
        depth = None if fields[1] == "None" else root / fields[1].lstrip("/")
        if check_files:
            for p, what in ((rgb, "image"), (depth, "depth map")):
                if p is not None and not p.is_file():
                    raise MimlabError(f"{path}:{lineno}: {what} not found: {p}")
        samples.append(DepthSample(rgb=rgb, depth=depth, focal=focal))
    samples = [s for s in samples if s.depth is not None]
    if not samples:
        raise MimlabError(f"{path}: no samples with ground truth")
    return samples


def find_depth_splits(data: str | Path, train_split: str | None = None,
                      val_split: str | None = None) -> tuple[Path, Path]:
    """The split files: `--train-split`/`--val-split` if given (relative to DATA or absolute), else
    `DATA/train.txt` and `DATA/val.txt` (or `DATA/test.txt`)."""
    data = Path(data)
    if not data.is_dir():
        raise ConfigError("data", f"{data}: not a directory")

    def pick(given: str | None, names: tuple[str, ...], param: str, flag: str) -> Path:
        if given:
            p = Path(given) if Path(given).is_absolute() else data / given
            if not p.is_file():
                raise ConfigError(param, f"{given}: file not found ({p})")
            return p
        for n in names:
            if (data / n).is_file():
                return data / n
        raise ConfigError("data", f"{data}: no split file {' or '.join(names)} (or pass {param} ({flag}))")

    return (pick(train_split, ("train.txt",), "train_split", "--train-split"),
            pick(val_split, ("val.txt", "test.txt"), "val_split", "--val-split"))


def crop_mask(shape: tuple[int, int], crop: str) -> np.ndarray:
    """Boolean (H, W) mask of the evaluation crop."""
    if crop not in CROPS:
        raise ConfigError("eval_crop", f"'{crop}': choose from {', '.join(CROPS)}")
    h, w = shape
    t, b, left, r = CROPS[crop]
    m = np.zeros((h, w), dtype=bool)
    m[int(t * h):int(b * h), int(left * w):int(r * w)] = True
    return m
