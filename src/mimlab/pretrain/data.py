"""Pretraining data: the built-in formula-driven images or an ImageFolder tree, augmented per sample seed.

``data`` (`mimlab.data.spec`): ``builtin`` or ``builtin:KIND?classes=100&per_class=32&seed=0`` -- the built-in
images rendered at the model's input size and cached (`mimlab.data.builtin`); or a directory: an ImageNet-layout
tree ``ROOT/CLASS/*.jpg`` (classes = sorted sub-directories holding images, files sorted), or a flat folder of
images (one class; masked image modeling only).

Augmentation (torchvision transforms v2 functionals on uint8 tensors): RandomResizedCrop (SimMIM: scale 0.67-1,
ratio 3/4-4/3) and horizontal flip per sample; the mean/std normalisation runs batched on the device
(`normalize`). Every random choice of sample ``i`` in epoch ``e`` (crop, flip, SimMIM
mask, MAE noise) is drawn from ``mix_seed(run_seed, e, i)`` (see `mimlab.engine.sampler`), so batches are
identical with any number of workers or processes, and after resuming.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from mimlab.data.images import ArraySource, FileSource
from mimlab.engine.sampler import SeededDataset
from mimlab.errors import ConfigError, MimlabError

# RandomResizedCrop scale per method: SimMIM official (0.67, 1); MAE official (0.2, 1); DeiT/timm (0.08, 1).
CROP_SCALE = {"simmim": (0.67, 1.0), "mae": (0.2, 1.0), "supervised": (0.08, 1.0)}
BAD_IMAGE_POLICIES = ("fail", "skip")


# ----------------------------------------------------------------------------------------- augmentation
def random_resized_crop_params(rng: np.random.Generator, height: int, width: int, scale: tuple[float, float],
                               ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(top, left, h, w) of an Inception-style random resized crop (Szegedy et al. 2015; torchvision's rule).

    Up to 10 tries: area fraction ~ U(scale), log aspect ratio (w/h) ~ U(log ratio), ``w = round(sqrt(A * r))``,
    ``h = round(sqrt(A / r))``; the first crop that fits is placed uniformly. Otherwise a centred crop of the
    whole image with its aspect ratio clamped to `ratio`.
    """
    area = height * width
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(lo, hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class Augment:
    """RandomResizedCrop + horizontal flip on a uint8 (3, H, W) tensor, drawn from a numpy generator.

    Applied with torchvision.transforms.v2.functional (antialiased bilinear resize); the output stays uint8 --
    `normalize` turns batches into float on the device, which keeps workers and host-to-device copies cheap.
    """

    size: tuple[int, int]
    scale: tuple[float, float]
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True

    def __call__(self, img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        top, left, h, w = random_resized_crop_params(rng, img.shape[-2], img.shape[-1], self.scale, self.ratio)
        out = F.resized_crop(img, top, left, h, w, list(self.size), antialias=True)
        if self.hflip and rng.random() < 0.5:
            out = F.horizontal_flip(out)
        return out


# ----------------------------------------------------------------------------------------- dataset
class PretrainDataset(SeededDataset):
    """Item = dict(image uint8 (3, H, W), label, [mask (gh, gw) uint8 | noise (L,) float32], _skipped).

    Everything random comes from ``numpy.random.Generator(PCG64(seed))`` in a fixed order: crop, flip, then the
    SimMIM mask (``mask_fn(rng)``, target ``"simmim"``) or the MAE noise (`num_tokens` uniforms, ``"mae"``).
    Unreadable images: ``bad_images="fail"`` raises naming the file; ``"skip"`` uses the next readable image
    (counted in ``_skipped``). Normalise batches with `normalize`.
    """

    def __init__(self, source: ArraySource | FileSource, augment: Augment, *, target: str,
                 mask_fn: Callable[[np.random.Generator], np.ndarray] | None = None, num_tokens: int = 0,
                 bad_images: str = "fail"):
        if bad_images not in BAD_IMAGE_POLICIES:
            raise ConfigError("bad_images", f"must be one of {', '.join(BAD_IMAGE_POLICIES)}, got '{bad_images}'")
        if target == "simmim" and mask_fn is None:
            raise ValueError("simmim target needs mask_fn")
        self.source = source
        self.augment = augment
        self.target = target
        self.mask_fn = mask_fn
        self.num_tokens = num_tokens
        self.bad_images = bad_images
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.source)

    def _load(self, index: int) -> tuple[Any, int, int]:
        n = len(self.source)
        for tries in range(n):
            i = (index + tries) % n
            try:
                return self.source.load(i), int(self.source.labels[i]), tries
            except MimlabError as e:
                if self.bad_images == "fail":
                    raise MimlabError(f"{e} (pass bad_images='skip' (--bad-images skip) to skip unreadable "
                                      "files)") from None
                if i not in self._warned:
                    self._warned.add(i)
                    print(f"warning: skipping unreadable image: {e}", file=sys.stderr)
        raise MimlabError("no readable image in the dataset")

    def get(self, index: int, seed: int) -> dict[str, Any]:
        img, label, skipped = self._load(index)
        rng = np.random.Generator(np.random.PCG64(seed))
        item: dict[str, Any] = {"image": self.augment(img, rng), "label": label, "_skipped": skipped}
        if self.target == "simmim":
            item["mask"] = torch.from_numpy(self.mask_fn(rng))
        elif self.target == "mae":
            item["noise"] = torch.from_numpy(rng.random(self.num_tokens, dtype=np.float32))
        return item


