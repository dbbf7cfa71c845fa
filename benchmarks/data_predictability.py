"""How much does each built-in dataset give masked image modeling to learn, and how hard is its label?

Without training a network, per kind (mimlab.data.synthetic.KINDS):

* **Local predictability** (SimMIM-style masking: a grid of ``block`` px cells, ``ceil(0.6 * cells)`` of them
  masked at random). Pixels are normalised with the ImageNet mean/std, as SimMIM's target is. Compare the L1 error
  over masked pixels (mean over pixels and channels) of
    (a) one colour per image, from the visible pixels: their mean, and their per-channel median (the constant
        that minimises L1, i.e. what an L1-trained model that learns nothing local converges to), with
    (b) local inpainting from visible neighbours: the nearest visible pixel, and Gaussian normalised convolution
        ``x_hat = (g * (m x)) / (g * m)`` (Knutsson & Westin 1993), ``m`` = visible indicator, sigma = block/2.
  ``ratio = min L1(b) / L1(a)``: lower = pixels more predictable from their surroundings = more for MIM to learn.
* **Label difficulty**: nearest-centroid accuracy on 8x8 area-downsampled normalised pixels (train on image
  indices ``0..k-1``, test on disjoint indices): lower = harder supervised task (chance = 1/C).
* **Speed**: images/s of ``render`` at 32, 64 and 224 px, one process, class parameters already cached.

    python benchmarks/data_predictability.py [--quick] [--examples docs/data_examples.png]
"""
from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

import numpy as np

from mimlab.data.synthetic import KINDS, SyntheticImages, render

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


def simmim_mask(rng: np.random.Generator, size: int, block: int, ratio: float = 0.6) -> np.ndarray:
    """(size, size) bool, True = masked: ``ceil(ratio * cells)`` random cells of a ``block`` px grid (SimMIM)."""
    if size % block:
        raise ValueError(f"size {size} is not a multiple of block {block}")
    g = size // block
    cells = np.zeros(g * g, bool)
    cells[rng.permutation(g * g)[: math.ceil(ratio * g * g)]] = True
    return np.kron(cells.reshape(g, g), np.ones((block, block), bool)).astype(bool)


def normalise(img: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 -> float ``(x / 255 - mean) / std`` with the ImageNet statistics."""
    return (img.astype(np.float64) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def mean_fill(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Every masked pixel := the per-channel mean of the visible pixels."""
    out = x.copy()
    out[mask] = x[~mask].mean(0)
    return out


def median_fill(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Every masked pixel := the per-channel median of the visible pixels (the L1-optimal constant)."""
    out = x.copy()
    out[mask] = np.median(x[~mask], 0)
    return out


def nearest_fill(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Every masked pixel := its nearest visible pixel (Euclidean; ties -> first visible in raster order)."""
    out = x.copy()
    mi, vi = np.argwhere(mask), np.argwhere(~mask)
    d = ((mi[:, None, :] - vi[None, :, :]) ** 2).sum(-1)
    src = vi[d.argmin(1)]
    out[mi[:, 0], mi[:, 1]] = x[src[:, 0], src[:, 1]]
    return out


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian filter (radius ceil(3 sigma), zero padding) over the first two axes."""
    r = max(1, math.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    for axis in (0, 1):
        pad = [(0, 0)] * a.ndim
        pad[axis] = (r, r)
        p = np.pad(a, pad)
        a = sum(w * np.take(p, np.arange(i, i + a.shape[axis]), axis=axis) for i, w in enumerate(k))
    return a


def normconv_fill(x: np.ndarray, mask: np.ndarray, sigma: float) -> np.ndarray:
    """Masked pixels := ``blur(m x) / blur(m)`` (normalised convolution); nearest visible where ``blur(m)`` ~ 0."""
    m = (~mask).astype(np.float64)
    num, den = _blur(x * m[..., None], sigma), _blur(m, sigma)
    out = x.copy()
    ok = mask & (den > 1e-6)
    out[ok] = num[ok] / den[ok][:, None]
    if (mask & ~ok).any():
        near = nearest_fill(x, mask)
        out[mask & ~ok] = near[mask & ~ok]
    return out


def masked_l1(pred: np.ndarray, x: np.ndarray, mask: np.ndarray) -> float:
    """Mean |pred - x| over masked pixels and channels (SimMIM's loss)."""
    return float(np.abs(pred[mask] - x[mask]).mean())


def predictability(images: np.ndarray, block: int, seed: int = 0) -> dict[str, float]:
    """Mean masked L1 of the four predictors over ``images`` (one fresh mask per image) and the ratios
    ``local / mean`` and ``local / median`` (local = the better of nearest and normconv) with bootstrap 95%
    intervals over images."""
    rng = np.random.default_rng(seed)
    errs: dict[str, list[float]] = {"mean": [], "median": [], "nearest": [], "normconv": []}
    for img in images:
        x, mask = normalise(img), simmim_mask(rng, img.shape[0], block)
        errs["mean"].append(masked_l1(mean_fill(x, mask), x, mask))
        errs["median"].append(masked_l1(median_fill(x, mask), x, mask))
        errs["nearest"].append(masked_l1(nearest_fill(x, mask), x, mask))
        errs["normconv"].append(masked_l1(normconv_fill(x, mask, sigma=block / 2), x, mask))
    e = {k: np.asarray(v) for k, v in errs.items()}
    out: dict[str, Any] = {f"l1_{k}": float(v.mean()) for k, v in e.items()}
    best = "nearest" if out["l1_nearest"] <= out["l1_normconv"] else "normconv"
    out["local"] = best
    boot = rng.integers(len(images), size=(1000, len(images)))  # bootstrap over images: 95% interval
    for const in ("mean", "median"):
        out[f"ratio_{const}"] = out[f"l1_{best}"] / out[f"l1_{const}"]
        r = e[best][boot].mean(1) / e[const][boot].mean(1)
        out[f"ratio_{const}_ci95"] = [float(np.quantile(r, 0.025)), float(np.quantile(r, 0.975))]
    return out


def downsample_features(images: np.ndarray, side: int = 8) -> np.ndarray:
    """(N, side*side*3): normalised pixels averaged over ``(H/side)^2`` areas."""
    n, h = images.shape[:2]
    f = h // side
    x = normalise(images).reshape(n, side, f, side, f, 3).mean((2, 4))
    return x.reshape(n, -1)


def nearest_centroid_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                              test_y: np.ndarray) -> float:
    """Share of test samples whose nearest (Euclidean) class centroid of the training samples is their class."""
    classes = np.unique(train_y)
    centroids = np.stack([train_x[train_y == c].mean(0) for c in classes])
    d = ((test_x[:, None, :] - centroids[None]) ** 2).sum(-1)
    return float((classes[d.argmin(1)] == test_y).mean())


def separability(kind: str, classes: int, train: int, test: int, size: int, workers: int) -> float:
    tr_x, tr_y = SyntheticImages(kind, classes=classes, per_class=train, size=size).to_array(workers)
    te_x, te_y = SyntheticImages(kind, classes=classes, per_class=test, size=size, offset=train).to_array(workers)
    return nearest_centroid_accuracy(downsample_features(tr_x), tr_y, downsample_features(te_x), te_y)


def speed(kind: str, size: int, n: int, classes: int = 10) -> float:
    for c in range(classes):  # warm the per-class caches (IFS search, palettes)
        render(kind, c, 0, size=size, num_classes=classes)
    t0 = time.perf_counter()
    for i in range(n):
        render(kind, i % classes, 1 + i // classes, size=size, num_classes=classes)
    return n / (time.perf_counter() - t0)


def contact_sheet(path: str, size: int = 96, columns: int = 8) -> None:
    """Rows = kinds; columns = classes 0..columns/2-1, two images each; kind names on the left."""
    from PIL import Image, ImageDraw

    label_w, pad = 110, 2
    sheet = Image.new("RGB", (label_w + columns * (size + pad), len(KINDS) * (size + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, kind in enumerate(KINDS):
        y = r * (size + pad)
        draw.text((6, y + size // 2 - 6), kind, fill=(0, 0, 0))
        for j in range(columns):
            img = render(kind, j // 2, j % 2, size=size, num_classes=1000)
            sheet.paste(Image.fromarray(img), (label_w + j * (size + pad), y))
    sheet.save(path, optimize=True)


def _ci(res: dict, key: str) -> str:
    lo, hi = res[f"{key}_ci95"]
    return f"**{res[key]:.2f}** [{lo:.2f}, {hi:.2f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer images (a smoke run)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--json", help="also write the numbers here")
    ap.add_argument("--examples", help="write a contact sheet PNG of every kind here")
    args = ap.parse_args()
    n_pred = 40 if args.quick else 300
    sep = [(10, 5, 5), (100, 2, 2)] if args.quick else [(10, 20, 10), (100, 10, 5)]
    results: dict[str, dict] = {}
    for kind in KINDS:
        res: dict = {}
        for size, block in ((32, 4), (64, 8)):
            per_class = max(1, n_pred // 100)
            imgs, _ = SyntheticImages(kind, classes=100, per_class=per_class, size=size, offset=1000) \
                .to_array(args.workers)
            res[f"pred_{size}px_block{block}"] = predictability(imgs, block)
        for classes, train, test in sep:
            res[f"ncc_acc_{classes}cls"] = separability(kind, classes, train, test, 32, args.workers)
        res["images_per_s"] = {str(s): speed(kind, s, 20 if args.quick else (100 if s < 224 else 30))
                               for s in (32, 64, 224)}
        results[kind] = res
        print(kind, json.dumps(res, indent=1), flush=True)

    print("\n| kind | image / block | L1 mean | L1 median | L1 nearest | L1 normconv | local / mean | "
          "local / median |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, r in results.items():
        for key, label in (("pred_32px_block4", "32 / 4 px"), ("pred_64px_block8", "64 / 8 px")):
            a = r[key]
            print(f"| {kind} | {label} | {a['l1_mean']:.3f} | {a['l1_median']:.3f} | {a['l1_nearest']:.3f} | "
                  f"{a['l1_normconv']:.3f} | {_ci(a, 'ratio_mean')} | {_ci(a, 'ratio_median')} |")
    print("\n| kind | NCC accuracy, 10 classes | NCC accuracy, 100 classes | images/s 32 px | 64 px | 224 px |")
    print("|---|---|---|---|---|---|")
    for kind, r in results.items():
        ips = r["images_per_s"]
        print(f"| {kind} | {r['ncc_acc_10cls']:.3f} | {r['ncc_acc_100cls']:.3f} | {ips['32']:.0f} | "
              f"{ips['64']:.0f} | {ips['224']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.examples:
        contact_sheet(args.examples)
        print("wrote", args.examples)


if __name__ == "__main__":
    main()
