"""Images for the probe: a folder (recursive, sorted by relative path) or a `.npy` array used as is."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mimlab.errors import MimlabError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def list_images(root: str | Path) -> list[Path]:
    """All image files under `root`, recursively, sorted by their path relative to `root`."""
    root = Path(root)
    if not root.exists():
        raise MimlabError(f"--data {root}: no such file or directory")
    if not root.is_dir():
        raise MimlabError(f"--data {root}: not a directory or a .npy file")
    files = sorted((p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise MimlabError(f"--data {root}: no images found (looked recursively for {', '.join(IMAGE_EXTENSIONS)})")
    return files


def open_rgb(path: Path):
    """Open an image as RGB, naming the file when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise MimlabError(f"cannot read image {path}: {e}") from None


class MultiTransformImages(Dataset):
    """Item i = tuple of `transform(load(items[i]))` for each transform (one per distinct model data config).

    `load` defaults to reading an image file (`items` are paths); pass another loader for in-memory sources."""

    def __init__(self, items: Sequence, transforms: Sequence[Callable], load: Callable | None = None):
        self.items = list(items)
        self.transforms = list(transforms)
        self.load = load or open_rgb

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        img = self.load(self.items[i])
        return tuple(t(img) for t in self.transforms)


class RepeatTensor(Dataset):
    """Item i = (x[i],) * k: a pre-normalised array shared by all models."""

    def __init__(self, x: torch.Tensor, k: int):
        self.x, self.k = x, k

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int):
        return (self.x[i],) * self.k


def load_npy(path: str | Path) -> torch.Tensor:
    """A float32 array N x 3 x H x W, already normalised, used as is."""
    path = Path(path)
    if not path.is_file():
        raise MimlabError(f"--data {path}: no such file")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise MimlabError(f"--data {path}: not a readable .npy array ({e})") from None
    if arr.ndim != 4 or arr.shape[1] != 3:
        raise MimlabError(f"--data {path}: expected shape N x 3 x H x W, got {tuple(arr.shape)}")
    if arr.dtype != np.float32:
        raise MimlabError(f"--data {path}: expected float32 (already normalised), got {arr.dtype}")
    return torch.from_numpy(np.ascontiguousarray(arr))
