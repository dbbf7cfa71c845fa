"""Reading images, 16-bit depth PNGs and text files, with errors that name the file."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from mimlab.errors import MimlabError

def read_text(path: str | Path, what: str = "file") -> str:
    """A UTF-8 text file's content; a missing, unreadable or non-text file is a MimlabError naming it."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MimlabError(f"{what} {path}: not a UTF-8 text file (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise MimlabError(f"{what} {path}: cannot read it ({e.strerror or e})") from None


def load_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as uint8 RGB (H, W, 3), decoded as `mimlab.data.images.open_rgb` describes (16-bit
    grey scaled to 8 bit, alpha dropped, oversized / float / corrupt files refused with the file's name)."""
    from mimlab.data.images import open_rgb

    path = Path(path)
    if not path.is_file():
        raise MimlabError(f"image file not found: {path}")
    return np.asarray(open_rgb(path))


def load_depth_png(path: str | Path, scale: float) -> np.ndarray:
    """Read a 16-bit single-channel depth PNG and divide by `scale` (1000 for mm, 256 for KITTI): float32 metres.

    Zero stays zero (= invalid). Anything but a 16-bit grayscale image is refused: an 8-bit or RGB depth map
    would silently give wrong metres. So are maps over PIL's decompression-bomb pixel limit and corrupt files.
    """
    path = Path(path)
    if not path.is_file():
        raise MimlabError(f"depth file not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # checked below, as an error
            with Image.open(path) as im:
                mode = im.mode
                w, h = im.size
                limit = Image.MAX_IMAGE_PIXELS
                if limit and w * h > limit:
                    raise MimlabError(f"depth map {path}: {w}x{h} = {w * h:,} pixels is more than the limit of "
                                      f"{limit:,} (PIL.Image.MAX_IMAGE_PIXELS, a decompression-bomb guard)")
                if mode not in ("I;16", "I;16B", "I;16L", "I"):
                    bits = {"1": "1-bit", "L": "8-bit", "P": "8-bit palette", "RGB": "RGB (3 channels)",
                            "RGBA": "RGBA (4 channels)", "LA": "8-bit grey+alpha", "F": "32-bit float"}.get(mode,
                                                                                                 f"mode {mode}")
                    raise MimlabError(f"depth map {path} is {bits}; expected a 16-bit single-channel PNG "
                                      f"(depth * {scale:g} as uint16)")
                arr = np.asarray(im).astype(np.float64)
    except MimlabError:
        raise
    except Exception as e:  # corrupt or truncated files: PIL raises OSError, ValueError, SyntaxError, ...
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MimlabError(f"cannot read depth map {path}: {text}") from None
    if arr.ndim != 2:
        raise MimlabError(f"depth map {path}: expected one channel, got shape {arr.shape}")
    if mode == "I" and arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise MimlabError(f"depth map {path}: values outside 0..65535, not a 16-bit depth PNG")
    return (arr / scale).astype(np.float32)
