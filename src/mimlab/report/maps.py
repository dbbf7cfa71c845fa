"""Attention maps as pictures: the rows `mimlab probe --maps N` stores in maps.npz, overlaid on the images.

For every model and image: one PNG per query (the class / prefix tokens and the chosen patches) with a panel per
layer (rows) and head (columns), each the query's attention to the patch tokens drawn over the image, and one PNG of
attention rollout (a panel per query). Colours are per panel (each panel's own maximum, but at least 4x uniform
attention, so a near-uniform head stays dark); the panel title gives that maximum and the mass on prefix keys, so
a head that attends to the class token, not to the image, says so.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mimlab.utils.io import atomic_path, load_json

DPI = 100
MAX_HEADS = 16                     # panels per row; more heads are shown in order up to this many


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def display_image(x: np.ndarray, mean: Any = None, std: Any = None) -> np.ndarray:
    """(3, h, w) as the model saw it -> (h, w, 3) in [0, 1]: un-normalised with the model's mean/std when known,
    else stretched to its own range."""
    x = x.astype(np.float64)
    if mean is not None and std is not None:
        x = x * np.asarray(std, dtype=np.float64)[:, None, None] + np.asarray(mean, dtype=np.float64)[:, None, None]
    else:
        x = (x - x.min()) / max(float(x.max() - x.min()), 1e-12)
    return np.clip(x, 0.0, 1.0).transpose(1, 2, 0)


def _overlay(ax, img: np.ndarray, attn_patches: np.ndarray, grid: tuple[int, int], title: str,
             cell: tuple[int, int] | None = None) -> None:
    """The image in grey, the attention to each patch in colour over it (the panel's own maximum = brightest), and
    the query's own patch outlined."""
    from matplotlib.patches import Rectangle

    h, w = img.shape[:2]
    ax.imshow(img.mean(-1), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    heat = attn_patches.reshape(grid)
    # the colour scale ends at the panel's maximum, but never below 4x uniform attention: a near-uniform head
    # stays dark instead of showing its rounding-level differences at full contrast
    ax.imshow(heat, cmap="inferno", alpha=0.7, extent=(0, w, h, 0), interpolation="nearest",
              vmin=0.0, vmax=max(float(heat.max()), 4.0 * float(heat.sum()) / heat.size, 1e-12))
    if cell is not None:
        ph, pw = h / grid[0], w / grid[1]
        ax.add_patch(Rectangle((cell[1] * pw, cell[0] * ph), pw, ph, fill=False, edgecolor="#00e5ff", linewidth=1.2))
    ax.set_title(title, fontsize=6, pad=2)
    ax.set_xticks([])
    ax.set_yticks([])


def _cell(query: str) -> tuple[int, int] | None:
    m = re.match(r"patch \((\d+), (\d+)\)", query)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def query_figure(rows: np.ndarray, img: np.ndarray, P: int, grid: tuple[int, int], title: str,
                 layer_names: list[str], query: str = "") -> Figure:
    """rows (L, H, N) of one query: a panel per layer (rows) and head (columns)."""
    L, H, _ = rows.shape
    H = min(H, MAX_HEADS)
    fig = Figure(figsize=(max(1.25 * H + 0.4, 6.0), 1.35 * L + 0.8), constrained_layout=True)
    axes = np.asarray(fig.subplots(L, H, squeeze=False))
    for li in range(L):
        for h in range(H):
            r = rows[li, h]
            _overlay(axes[li, h], img, r[P:], grid, f"{layer_names[li]} h{h}\nmax {r[P:].max():.2f}"
                     + (f", prefix {r[:P].sum():.2f}" if P else ""), _cell(query))
    fig.suptitle(title, fontsize=9)
    return fig


def rollout_figure(rollout: np.ndarray, img: np.ndarray, P: int, grid: tuple[int, int], queries: list[str],
                   title: str) -> Figure:
    Q = rollout.shape[0]
    fig = Figure(figsize=(max(2.0 * Q + 0.4, 6.0), 2.8), constrained_layout=True)
    axes = np.asarray(fig.subplots(1, Q, squeeze=False))[0]
    for qi in range(Q):
        r = rollout[qi]
        _overlay(axes[qi], img, r[P:], grid, f"{queries[qi]}\nmax {r[P:].max():.3f}"
                 + (f", prefix {r[:P].sum():.2f}" if P else ""), _cell(queries[qi]))
    fig.suptitle(title, fontsize=9)
    return fig


def write_map_figures(metrics: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, list[Path]]:
    """PNGs under OUT/maps/ from OUT/maps.npz and maps.json; {model label: [paths]} (empty without maps)."""
    out = Path(out_dir)
    npz, meta_file = out / "maps.npz", out / "maps.json"
    if not npz.is_file() or not meta_file.is_file():
        return {}
    meta = load_json(meta_file)
    transforms = (metrics.get("provenance", {}).get("data", {}) or {}).get("transforms") or []
    labels = list(metrics["models"])
    written: dict[str, list[Path]] = {}
    with np.load(npz) as z:
        for label, info in meta.items():
            rows, rollout, images = z[f"{label}/rows"], z[f"{label}/rollout"], z[f"{label}/images"]
            tf = transforms[labels.index(label)] if label in labels and labels.index(label) < len(transforms) else {}
            P, grid, queries = int(info["num_prefix"]), tuple(info["grid"]), list(info["queries"])
            names = [layer["name"] for layer in metrics["models"][label]["layers"]]
            paths = []
            for i in range(images.shape[0]):
                img = display_image(images[i], tf.get("mean"), tf.get("std"))
                for qi, q in enumerate(queries):
                    fig = query_figure(rows[i, :, :, qi], img, P, grid, f"{label}, image {i}: attention of the "
                                       f"{q} query to the patches, every layer and head", names, q)
                    paths.append(_save(fig, out / "maps" / f"{_slug(label)}_img{i}_{_slug(q)}.png"))
                fig = rollout_figure(rollout[i], img, P, grid, queries,
                                     f"{label}, image {i}: attention rollout (Abnar & Zuidema 2020)")
                paths.append(_save(fig, out / "maps" / f"{_slug(label)}_img{i}_rollout.png"))
            written[label] = paths
    return written


def maps_count(paths: dict[str, list[Path]]) -> int:
    return sum(len(v) for v in paths.values())


__all__ = ["display_image", "query_figure", "rollout_figure", "write_map_figures", "maps_count"]
