"""The built-in images rendered once per configuration and kept in mimlab's cache (`mimlab.utils.cache`), so later
runs start at once."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mimlab.utils.cache import cache_dir


def builtin_array(kind: str, *, classes: int, per_class: int, size: int, seed: int = 0, offset: int = 0,
                  workers: int | None = None, use_cache: bool = True) -> tuple[np.ndarray, np.ndarray, Path | None]:
    """Rendered built-in images ``(N, size, size, 3) uint8``, labels ``(N,)`` and the cache file used."""
    from mimlab.data.synthetic import GENERATOR_VERSION, SyntheticImages
    from mimlab.utils.io import atomic_path

    ds = SyntheticImages(kind, classes=classes, per_class=per_class, size=size, seed=seed, offset=offset)
    name = f"{kind}-c{classes}-n{per_class}-o{offset}-s{size}-seed{seed}-v{GENERATOR_VERSION}.npz"
    path = cache_dir("builtin") / name
    if use_cache and path.exists():
        try:
            with np.load(path) as z:
                return z["images"], z["labels"], path
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache file is regenerated
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    images, labels = ds.to_array(workers)
    if use_cache:
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.savez(f, images=images, labels=labels)
        except OSError:
            path = None
    return images, labels, path if use_cache else None
