"""Built-in synthetic transfer datasets, written in the real on-disk formats so the real loaders run on them.

- `finegrained`: ImageFolder classification, classes differ by small details (see `finegrained.py`).
- `keypoints`: stick figures with 13 keypoints, COCO keypoint JSON (see `keypoints.py`).
- `depth`: layered indoor scenes with exact depth maps, NYUv2 layout (see `depth.py`).
- `tracking`: a moving target among distractors, GOT-10k layout (see `tracking.py`).

Python: `generate(kind, out, **params)`; on the command line, `mimlab data KIND` (`mimlab.cli.data`) with each
kind's options from `KINDS`.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable

from mimlab.errors import MimlabError

# kind -> (module, function, help, {option: (type, default, help)})
KINDS: dict[str, tuple[str, str, str, dict[str, tuple[type, Any, str]]]] = {
    "finegrained": ("finegrained", "generate_finegrained",
                    "fine-grained classification (ImageFolder): one base shape, classes differ by small details",
                    {"num_classes": (int, 6, "number of classes (2-9)"),
                     "train_per_class": (int, 200, "training images per class"),
                     "val_per_class": (int, 50, "validation images per class"),
                     "size": (int, 32, "image side in pixels")}),
    "keypoints": ("keypoints", "generate_keypoints",
                  "articulated stick figures with 13 keypoints (COCO keypoint JSON)",
                  {"train_images": (int, 600, "training images"), "val_images": (int, 100, "validation images"),
                   "size": (int, 64, "image side in pixels"), "max_figures": (int, 2, "figures per image, at most")}),
    "depth": ("depth", "generate_depth", "layered scenes with exact depth maps (NYUv2 layout, 16-bit mm PNGs)",
              {"train_images": (int, 800, "training images"), "val_images": (int, 100, "validation images"),
               "width": (int, 64, "image width in pixels"), "height": (int, 48, "image height in pixels")}),
    "tracking": ("tracking", "generate_tracking", "a moving target among distractors (GOT-10k layout)",
                 {"train_sequences": (int, 80, "training sequences"),
                  "val_sequences": (int, 20, "validation sequences"),
                  "length": (int, 60, "frames per sequence"), "size": (int, 96, "frame side in pixels")}),
}


def _generator(kind: str) -> Callable[..., dict]:
    if kind not in KINDS:
        raise MimlabError(f"unknown synthetic dataset '{kind}' (choose from {', '.join(KINDS)})")
    module, func, _, _ = KINDS[kind]
    return getattr(importlib.import_module(f"mimlab.data.downstream.{module}"), func)


def generate(kind: str, out: str | Path, *, seed: int = 0, overwrite: bool = False, progress: bool = False,
             **params: Any) -> dict:
    """Write synthetic dataset `kind` to `out`; returns the parameters (also written to `out/dataset.json`).
    `progress`: a progress bar on stderr."""
    known = set(KINDS.get(kind, ("", "", "", {}))[3])
    unknown = set(params) - known
    if kind in KINDS and unknown:
        raise MimlabError(f"synthetic '{kind}': unknown parameter(s) {sorted(unknown)} (known: {sorted(known)})")
    return _generator(kind)(out, seed=seed, overwrite=overwrite, progress=progress, **params)
