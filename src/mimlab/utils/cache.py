"""mimlab's cache folder: `$MIMLAB_CACHE`, else `~/.cache/mimlab` (rendered built-in data, the compiled CPU kernel)."""
from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "MIMLAB_CACHE"


def cache_dir(*parts: str) -> Path:
    """The cache root, or a folder under it (not created)."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "mimlab")
    return Path(root).joinpath(*parts)
