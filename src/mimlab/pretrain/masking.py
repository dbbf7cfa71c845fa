"""Masks for masked image modeling: SimMIM block masks, SimMIM's AvgDist, MAE random shuffles.

SimMIM (Xie et al., CVPR 2022, official defaults): the image is cut into cells of ``mask_patch_size`` px (32 at
192/224 px); ``ceil(ratio * cells)`` cells (ratio 0.6) chosen uniformly without replacement are masked, a new
draw per sample; the model sees the mask at its token resolution (each cell covers ``(mask_patch/patch)^2``
tokens). MAE (He et al., CVPR 2022): per-sample uniform noise, ``argsort`` gives a random shuffle, the first
``L * (1 - ratio)`` tokens are kept (``int`` rounding, as in the official code), ``argsort`` of the shuffle
restores the order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from mimlab.errors import ConfigError, MimlabError

SIMMIM_MASK_PATCH = 32      # official mask cell (px) at 192 and 224 px
SIMMIM_REF_CELLS = 7        # official cells per side at 224 px (224 / 32)
SIMMIM_MASK_RATIO = 0.6
MAE_MASK_RATIO = 0.75


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return int(v[0]), int(v[1])
    return int(v), int(v)


def choose_mask_patch_size(img_size: Any, patch_size: int) -> int:
    """The mask cell (px) for an image of `img_size` and a model with `patch_size`-px tokens.

    Official geometry when it fits: 32 px if both sides are >= 192 and divisible by 32 and 32 is a multiple of
    the patch size. Otherwise the grid is scaled with the image: the multiple of `patch_size` dividing both sides
    that is closest to ``min(H, W) / 7`` (224 / 32 = 7 cells per side), ties to the larger, never below the
    patch size (e.g. 32 px images with patch 4 -> 4 px cells, an 8 x 8 grid).
    """
    h, w = _pair(img_size)
    if patch_size < 1 or h % patch_size or w % patch_size:
        raise MimlabError(f"image size {h}x{w} is not a multiple of the patch size {patch_size}")
    if min(h, w) >= 192 and h % SIMMIM_MASK_PATCH == 0 and w % SIMMIM_MASK_PATCH == 0 \
            and SIMMIM_MASK_PATCH % patch_size == 0:
        return SIMMIM_MASK_PATCH
    target = min(h, w) / SIMMIM_REF_CELLS
    cands = [m for m in range(patch_size, min(h, w) + 1, patch_size) if h % m == 0 and w % m == 0]
    return min(cands, key=lambda m: (abs(m - target), -m))


@dataclass(frozen=True)
class MaskGeometry:
    """SimMIM masking geometry for one model input size."""

    img_size: tuple[int, int]
    patch_size: int          # model token size (px); Swin: its patch embedding (4)
    mask_patch_size: int     # mask cell (px)
    mask_ratio: float

    def __post_init__(self) -> None:
        h, w = self.img_size
        m, p = self.mask_patch_size, self.patch_size
        if m % p:
            raise ConfigError("mask_patch_size", f"{m} must be a multiple of the model's patch size {p}")
        if h % m or w % m:
            raise ConfigError("mask_patch_size", f"{m} must divide the image size {h}x{w}")
        if not 0 < self.mask_ratio < 1:
            raise ConfigError("mask_ratio", f"must be in (0, 1), got {self.mask_ratio}")

    @property
    def cells(self) -> tuple[int, int]:
        return self.img_size[0] // self.mask_patch_size, self.img_size[1] // self.mask_patch_size

    @property
    def num_cells(self) -> int:
        return self.cells[0] * self.cells[1]

    @property
    def num_masked(self) -> int:
        """``ceil(ratio * cells)`` as in the official generator (at least 1, at most cells - 1)."""
        return min(self.num_cells - 1, max(1, math.ceil(self.mask_ratio * self.num_cells - 1e-9)))

    @property
    def scale(self) -> int:
        """Tokens per mask cell side."""
        return self.mask_patch_size // self.patch_size

    @property
    def token_grid(self) -> tuple[int, int]:
        return self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """One mask at token resolution, ``uint8 (H/patch, W/patch)``, 1 = masked."""
        return simmim_block_mask(self.cells, self.num_masked, self.scale, rng)

    def describe(self, avg_dist_samples: int = 64) -> dict[str, Any]:
        return {
            "img_size": list(self.img_size), "patch_size": self.patch_size,
            "mask_patch_size": self.mask_patch_size, "mask_ratio": self.mask_ratio,
            "mask_cells": list(self.cells), "masked_cells": self.num_masked,
            "masked_fraction": self.num_masked / self.num_cells,
            "avg_dist_px": round(expected_avg_dist(self, samples=avg_dist_samples), 3),
        }


def simmim_block_mask(cells: tuple[int, int], num_masked: int, scale: int, rng: np.random.Generator) -> np.ndarray:
    """Mask exactly `num_masked` of the ``cells`` grid (uniform without replacement), upsampled by `scale`."""
    ch, cw = cells
    flat = np.zeros(ch * cw, dtype=np.uint8)
    flat[rng.permutation(ch * cw)[:num_masked]] = 1
    cell_mask = flat.reshape(ch, cw)
    return cell_mask.repeat(scale, axis=0).repeat(scale, axis=1)


def upsample(mask: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upsampling of a 2-d mask by an integer factor (token mask -> pixel mask)."""
    return mask.repeat(factor, axis=-2).repeat(factor, axis=-1)


def distance_to_visible(masked: np.ndarray) -> np.ndarray:
    """Exact Euclidean distance (px, between pixel centres) from every pixel to the nearest visible pixel.

    Visible pixels get 0. Two passes: the vertical distance ``g`` to the nearest visible pixel of each column,
    then ``d(y, x)^2 = min_x' (x - x')^2 + g(y, x')^2`` along rows (the separable exact EDT). Needs at least
    one visible pixel.
    """
    masked = np.asarray(masked, dtype=bool)
    if masked.ndim != 2:
        raise ValueError("expected a 2-d mask")
    if masked.all():
        raise MimlabError("the mask hides every pixel: no visible pixel to measure a distance to")
    h, w = masked.shape
    inf = float(h + w + 1)
    g = np.empty((h, w), dtype=np.float64)
    prev = np.full(w, inf)
    for y in range(h):  # downward scan
        prev = np.where(masked[y], prev + 1, 0.0)
        g[y] = prev
    prev = np.full(w, inf)
    for y in range(h - 1, -1, -1):  # upward scan
        prev = np.where(masked[y], prev + 1, 0.0)
        g[y] = np.minimum(g[y], prev)
    xs = np.arange(w, dtype=np.float64)
    dx2 = (xs[:, None] - xs[None, :]) ** 2  # (x, x')
    d2 = np.empty((h, w), dtype=np.float64)
    for y in range(h):
        d2[y] = (dx2 + (g[y] ** 2)[None, :]).min(axis=1)
    return np.sqrt(d2)


def avg_dist(masked: np.ndarray) -> float:
    """SimMIM's AvgDist: mean over masked pixels of the distance to the nearest visible pixel (px)."""
    masked = np.asarray(masked, dtype=bool)
    if not masked.any():
        return 0.0
    return float(distance_to_visible(masked)[masked].mean())


def expected_avg_dist(geom: MaskGeometry, samples: int = 64, seed: int = 0) -> float:
    """AvgDist averaged over `samples` random masks of `geom` (pixel resolution)."""
    rng = np.random.default_rng(seed)
    vals = [avg_dist(upsample(geom.sample(rng), geom.patch_size)) for _ in range(samples)]
    return float(np.mean(vals))


# ----------------------------------------------------------------------------------------- MAE
def mae_keep_count(num_tokens: int, ratio: float) -> int:
    """Visible tokens kept by MAE: ``int(L * (1 - ratio))`` (official), at least 1."""
    if not 0 <= ratio < 1:
        raise ConfigError("mask_ratio", f"must be in [0, 1), got {ratio}")
    return max(1, int(num_tokens * (1 - ratio)))


def shuffle_ids(noise):
    """(ids_shuffle, ids_restore) from per-sample noise (B, L): ascending noise first; restore = argsort."""
    import torch

    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return ids_shuffle, ids_restore


def gather_tokens(x, ids):
    """``out[b, i] = x[b, ids[b, i]]`` for tokens x (B, L, D) and indices (B, K)."""
    import torch

    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def mae_mask(ids_restore, keep: int):
    """Binary mask (B, L) in the original order: 0 = kept (visible), 1 = removed."""
    import torch

    b, n = ids_restore.shape
    m = torch.ones(b, n, device=ids_restore.device)
    m[:, :keep] = 0
    return torch.gather(m, 1, ids_restore)
