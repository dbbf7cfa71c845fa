"""Reading images and 16-bit depth PNGs, with errors that name the file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mimlab.errors import MimlabError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")


def load_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as uint8 RGB (H, W, 3)."""
    path = Path(path)
    if not path.is_file():
        raise MimlabError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise MimlabError(f"cannot read image {path}: {e}") from None


def load_depth_png(path: str | Path, scale: float) -> np.ndarray:
    """Read a 16-bit single-channel depth PNG and divide by `scale` (1000 for mm, 256 for KITTI): float32 metres.

    Zero stays zero (= invalid). Anything but a 16-bit grayscale image is refused: an 8-bit or RGB depth map
    would silently give wrong metres.
    """
    path = Path(path)
    if not path.is_file():
        raise MimlabError(f"depth file not found: {path}")
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode not in ("I;16", "I;16B", "I;16L", "I"):
                bits = {"1": "1-bit", "L": "8-bit", "P": "8-bit palette", "RGB": "8-bit RGB", "RGBA": "8-bit RGBA",
                        "LA": "8-bit grey+alpha", "F": "32-bit float"}.get(mode, f"mode {mode}")
                raise MimlabError(f"depth map {path} is {bits}; expected a 16-bit single-channel PNG "
                                  f"(depth * {scale:g} as uint16)")
            arr = np.asarray(im).astype(np.float64)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise MimlabError(f"cannot read depth map {path}: {e}") from None
    if mode == "I" and (arr.min() < 0 or arr.max() > 65535):
        raise MimlabError(f"depth map {path}: values outside 0..65535, not a 16-bit depth PNG")
    return (arr / scale).astype(np.float32)
