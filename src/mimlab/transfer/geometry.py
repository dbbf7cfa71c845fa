"""Image geometry shared by the tasks: affine crops with Pillow, and image -> normalised tensor.

Coordinates are continuous: pixel (i, j) covers [j, j+1) x [i, i+1), so its centre is (j + 0.5, i + 0.5).
An affine crop is a 3x3 matrix M mapping crop coordinates to image coordinates; Pillow's AFFINE transform samples
the source at M applied to each output pixel centre, in this same continuous convention.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def crop_matrix(center: tuple[float, float], size: tuple[float, float], out_size: tuple[int, int],
                rotation: float = 0.0, flip: bool = False) -> np.ndarray:
    """M (3x3) mapping output (crop) coordinates to image coordinates: the `size` = (w, h) region centred at
    `center`, rotated by `rotation` radians (counter-clockwise in the image), mirrored if `flip`."""
    ow, oh = out_size
    sx, sy = size[0] / ow, size[1] / oh
    c, s = np.cos(rotation), np.sin(rotation)
    to_center = np.array([[1, 0, -ow / 2], [0, 1, -oh / 2], [0, 0, 1]], float)
    flip_m = np.array([[-1, 0, 0], [0, 1, 0], [0, 0, 1]], float) if flip else np.eye(3)
    scale = np.diag([sx, sy, 1.0])
    rot = np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]], float)
    shift = np.array([[1, 0, center[0]], [0, 1, center[1]], [0, 0, 1]], float)
    return shift @ rot @ scale @ flip_m @ to_center


def warp(img: np.ndarray, m: np.ndarray, out_size: tuple[int, int], fill: tuple[int, ...] | None = None) -> np.ndarray:
    """Sample `img` (H, W, 3 uint8) at M @ (output pixel centres); outside the image: `fill` (default: mean colour)."""
    if fill is None:
        fill = tuple(int(v) for v in img.reshape(-1, img.shape[-1]).mean(0).round())
    coeffs = tuple(m[:2].reshape(-1))
    out = Image.fromarray(img).transform(tuple(out_size), Image.AFFINE, coeffs, resample=Image.BILINEAR,
                                         fillcolor=fill)
    return np.asarray(out)


def apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Apply the 3x3 affine `m` to (N, 2) points."""
    pts = np.asarray(pts, float)
    return pts @ m[:2, :2].T + m[:2, 2]


def resize(img: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Resize an (H, W[, C]) array to `size` = (w, h)."""
    if img.shape[1] == size[0] and img.shape[0] == size[1]:
        return img
    mode = "F" if img.dtype == np.float32 and img.ndim == 2 else None
    pil = Image.fromarray(img, mode=mode) if mode else Image.fromarray(img)
    return np.asarray(pil.resize(tuple(size), Image.NEAREST if nearest else Image.BILINEAR))


def to_tensor(img: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (3, H, W), (x / 255 - mean) / std."""
    x = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (x - m) / s
