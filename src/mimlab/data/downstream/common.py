"""Shared drawing helpers for the synthetic transfer datasets (numpy + Pillow only, seeded)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from mimlab.errors import ConfigError, MimlabError


def rng_for(seed: int, *keys: int) -> np.random.Generator:
    """An independent generator per (seed, key...) so each sample is reproducible on its own."""
    return np.random.default_rng([int(seed), *[int(k) for k in keys]])


def smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Value noise in [0, 1]: a `cells x cells` random grid upsampled bilinearly to (h, w)."""
    cells = max(2, int(cells))
    grid = rng.random((cells, cells)).astype(np.float32)
    img = Image.fromarray(grid, mode="F").resize((w, h), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32).clip(0.0, 1.0)


def textured_background(rng: np.random.Generator, h: int, w: int, contrast: float = 0.35) -> np.ndarray:
    """An RGB float image in [0, 1]: two random colours mixed by multi-scale value noise, plus fine grain."""
    c0, c1 = rng.random(3), rng.random(3)
    mix = 0.6 * smooth_noise(rng, h, w, rng.integers(2, 6)) + 0.4 * smooth_noise(rng, h, w, rng.integers(6, 16))
    img = c0[None, None] * (1 - mix[..., None]) + c1[None, None] * mix[..., None]
    img = 0.5 + (img - 0.5) * contrast * 2.0
    img += rng.normal(0.0, 0.02, size=img.shape)
    return img.clip(0.0, 1.0).astype(np.float32)


def to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.asarray(img, dtype=np.float32).clip(0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def rgb255(color) -> tuple[int, int, int]:
    c = np.asarray(color, dtype=np.float32).clip(0.0, 1.0)
    return tuple(int(round(v * 255)) for v in c)  # type: ignore[return-value]


def prepare_out(out: str | Path, overwrite: bool, owned: tuple[str, ...]) -> Path:
    """Create `out`; refuse a non-empty directory unless `overwrite`, which deletes only the generator's own
    outputs (`owned`, names relative to `out`) so no stale file of an earlier dataset survives."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError("out", f"{out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError("out", f"{out}: directory is not empty (pass overwrite=True (--overwrite) to replace the "
                                     "dataset)")
        for name in (*owned, "dataset.json"):
            p = out / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def check_positive(**values: float) -> None:
    for name, v in values.items():
        if v is None or v <= 0:
            raise MimlabError(f"{name} must be > 0 (got {v})")


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "img"):
    """A tqdm bar on stderr (a no-op bar when not `enabled`)."""
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True)
