"""Deterministic formula-driven images: IFS fractals, dead leaves, and fractals over dead leaves.

Every image is a pure function of ``(kind, seed, class index, image index, size)``; ``num_classes`` only
validates the class index, so class ``c`` looks the same in a 10-class and a 1000-class set. Random numbers
come from ``numpy.random.SeedSequence`` keyed by those integers, so any subset can be regenerated alone,
identically, whatever the worker count. All scene parameters are drawn in resolution-free units before
anything size-dependent, so the same (class, index) at 32 and 224 px shows the same scene.

Kinds (see docs/data.md for the measurements behind ``DEFAULT_KIND``):

* ``fractals`` -- FractalDB-style categories (Kataoka et al., "Pre-training without Natural Images",
  ACCV 2020): a class is a random iterated function system (IFS) of 2-8 contractive affine maps, rendered by
  the chaos game on black. Maps are parameterised by their SVD with the "sigma factor" of Anderson & Farrell
  ("Improving Fractal Pre-training", WACV 2022); degenerate systems are rejected by FractalDB's filling rate.
  Per image: colours, small jitter of the maps, flips, scale and position.
* ``deadleaves`` -- the dead-leaves model (Matheron 1968; Lee, Mumford & Huang, IJCV 2001): occluding discs and
  rotated rectangles with radii of density ``p(r) ~ r^-3`` on ``[rmin, rmax]``. Each class has its own palette
  and shape statistics.
* ``fractal-leaves`` -- a fractal-category object (the class) drawn over a dead-leaves background whose
  palette is random per image (so only the fractal carries the label).
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import PIL
from PIL import Image, ImageDraw

from mimlab.errors import MimlabError

KINDS = ("fractals", "deadleaves", "fractal-leaves")
# Chosen from benchmarks/data_predictability.py (docs/data.md): locally predictable pixels and a hard label.
DEFAULT_KIND = "fractal-leaves"
# Bump when the images a given set of arguments produces change (dataset.json records it).
GENERATOR_VERSION = 1

_KIND_CODE = {"fractals": 1, "deadleaves": 2, "fractal-leaves": 3}
# Stream tags keep the independent random streams apart.
_S_IFS, _S_LEAVES_CLASS, _S_LEAVES_HUE, _S_IMAGE, _S_POINTS = 101, 102, 103, 104, 105
_GOLDEN = 0.6180339887498949
MIN_SIZE = 8

# IFS sampling
MIN_MAPS, MAX_MAPS = 2, 8
MAX_SINGULAR = 0.95          # largest singular value of any map (contraction)
FILL_RANGE = (0.12, 0.55)    # accepted FractalDB filling rate on a 32x32 grid
MIN_ASPECT = 0.2             # accepted min/max extent of the attractor's bounding box
# Dead leaves
LEAF_ALPHA = 3.0             # p(r) ~ r^-alpha, the scale-invariant choice (Lee, Mumford & Huang 2001)
LEAF_RMIN = 0.06             # fractions of the image side
LEAF_COVER = 3.5             # mean leaves over a point (background shows through ~ exp(-3.5) = 3%)
MAX_LEAVES = 4000


# ----------------------------------------------------------------------------------------- validation
def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise MimlabError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise MimlabError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_kind(kind: Any) -> str:
    if kind not in KINDS:
        raise MimlabError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    return str(kind)


def _rng(*keys: int) -> np.random.Generator:
    """A generator keyed by non-negative integers (order matters)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in keys])))


# ----------------------------------------------------------------------------------------- colour
def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB, all in [0, 1] (hue wraps); returns shape ``h.shape + (3,)``."""
    h = np.mod(np.asarray(h, dtype=np.float64), 1.0)
    s = np.clip(np.asarray(s, dtype=np.float64), 0, 1)
    v = np.clip(np.asarray(v, dtype=np.float64), 0, 1)
    h, s, v = np.broadcast_arrays(h, s, v)
    i = np.floor(h * 6.0).astype(np.int64) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = np.stack([np.stack(c, -1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])
    return np.take_along_axis(table, i[None, ..., None].repeat(3, -1), 0)[0]


# ----------------------------------------------------------------------------------------- fractals
def _rot(t: np.ndarray) -> np.ndarray:
    c, s = np.cos(t), np.sin(t)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)


@dataclass(frozen=True)
class IFS:
    """K affine maps ``x -> A_k x + b_k``, map k chosen with probability ``p_k`` in the chaos game.

    ``A_k = R(theta_k) diag(s1_k, d_k s2_k) R(phi_k)`` with ``1 > s1 >= s2 > 0`` (so ``||A_k||_2 = s1 < 1``:
    every map is a contraction) and ``d = +-1`` (reflection).
    """

    theta: np.ndarray
    phi: np.ndarray
    s1: np.ndarray
    s2: np.ndarray
    d: np.ndarray
    b: np.ndarray  # (K, 2)
    p: np.ndarray

    @property
    def matrices(self) -> np.ndarray:
        diag = np.zeros((len(self.s1), 2, 2))
        diag[:, 0, 0], diag[:, 1, 1] = self.s1, self.d * self.s2
        return _rot(self.theta) @ diag @ _rot(self.phi)


def sample_ifs(rng: np.random.Generator, n_maps: int | None = None) -> IFS:
    """A random IFS with 2-8 maps whose sigma factor ``sum_k (s1_k + 2 s2_k)`` lies in ``[(5+K)/2, (6+K)/2]``.

    That band (Anderson & Farrell 2022) gives attractors that are neither dust nor filled blobs. The budget is
    split over the maps so that every split is feasible (``s2 <= s1 <= MAX_SINGULAR``); map probabilities are
    proportional to ``|det A_k| = s1 s2`` (Barnsley's rule), floored at 2% of their sum.
    """
    k = int(rng.integers(MIN_MAPS, MAX_MAPS + 1)) if n_maps is None else n_maps
    cmin, cmax = 0.3, 3 * MAX_SINGULAR  # range of one map's s1 + 2 s2
    remaining = rng.uniform((5 + k) / 2, (6 + k) / 2)
    s1, s2 = np.empty(k), np.empty(k)
    for i in range(k):
        left = k - 1 - i
        lo, hi = max(cmin, remaining - left * cmax), min(cmax, remaining - left * cmin)
        c = remaining if left == 0 else rng.uniform(lo, hi)
        remaining -= c
        s1[i] = rng.uniform(c / 3, min(MAX_SINGULAR, 2 * c / 3))  # s2 = (c - s1) / 2 >= s1 / 4
        s2[i] = (c - s1[i]) / 2
    order = rng.permutation(k)
    s1, s2 = s1[order], s2[order]
    det = s1 * s2
    p = np.maximum(det, 0.02 * det.sum())
    return IFS(theta=rng.uniform(0, 2 * np.pi, k), phi=rng.uniform(0, 2 * np.pi, k), s1=s1, s2=s2,
               d=rng.choice([-1.0, 1.0], k), b=rng.uniform(-1, 1, (k, 2)), p=p / p.sum())


def jitter_ifs(ifs: IFS, rng: np.random.Generator, amount: float = 0.05) -> IFS:
    """Per-image variation: singular values x (1 +- amount), angles and shifts +- amount (clipped contractive)."""
    k = len(ifs.s1)
    s1 = np.minimum(ifs.s1 * (1 + rng.uniform(-amount, amount, k)), MAX_SINGULAR)
    s2 = np.minimum(ifs.s2 * (1 + rng.uniform(-amount, amount, k)), s1)
    return IFS(theta=ifs.theta + rng.uniform(-amount, amount, k), phi=ifs.phi + rng.uniform(-amount, amount, k),
               s1=s1, s2=s2, d=ifs.d, b=ifs.b + rng.uniform(-amount, amount, (k, 2)), p=ifs.p)


def chaos_game(ifs: IFS, n_points: int, rng: np.random.Generator, *, chains: int = 1024,
               burn_in: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n_points`` attractor points as coordinate arrays ``x, y`` and the index of the map that produced each.

    Runs ``chains`` independent chains in parallel (numpy), each started at the fixed point
    ``x* = (I - A_0)^-1 b_0`` of map 0, which lies on the attractor; the first ``burn_in`` steps are dropped so
    the chains decorrelate.
    """
    a = ifs.matrices
    chains = max(1, min(chains, n_points))
    steps = -(-n_points // chains)
    cdf = np.cumsum(ifs.p)
    cdf[-1] = 1.0
    choice = np.searchsorted(cdf, rng.random((burn_in + steps, chains)), side="right")  # map k w.p. p_k
    fixed = np.linalg.solve(np.eye(2) - a[0], ifs.b[0])
    x, y = np.full(chains, fixed[0]), np.full(chains, fixed[1])
    a00, a01, a10, a11 = a[:, 0, 0], a[:, 0, 1], a[:, 1, 0], a[:, 1, 1]
    b0, b1 = ifs.b[:, 0], ifs.b[:, 1]
    xs, ys = np.empty((steps, chains)), np.empty((steps, chains))
    for t in range(burn_in + steps):
        k = choice[t]
        x, y = a00[k] * x + a01[k] * y + b0[k], a10[k] * x + a11[k] * y + b1[k]
        if t >= burn_in:
            xs[t - burn_in], ys[t - burn_in] = x, y
    return xs.reshape(-1)[:n_points], ys.reshape(-1)[:n_points], choice[burn_in:].reshape(-1)[:n_points]


def filling_rate(x: np.ndarray, y: np.ndarray, grid: int = 32) -> tuple[float, float]:
    """(fraction of occupied cells, min/max bbox extent) after fitting the points' bounding box into a square grid.

    FractalDB's filling rate: the share of the canvas the rendered attractor covers; dust and lines score low,
    filled blobs high.
    """
    ext = np.array([np.ptp(x), np.ptp(y)])
    if not np.isfinite(ext).all() or ext.max() <= 0:
        return 0.0, 0.0
    ix = np.clip(((x - x.min()) / ext.max() * grid).astype(np.int64), 0, grid - 1)
    iy = np.clip(((y - y.min()) / ext.max() * grid).astype(np.int64), 0, grid - 1)
    occupied = np.count_nonzero(np.bincount(iy * grid + ix, minlength=grid * grid))
    return occupied / grid**2, float(ext.min() / ext.max())


@lru_cache(maxsize=4096)
def class_ifs(seed: int, class_idx: int) -> IFS:
    """The IFS of fractal class ``class_idx`` (shared by ``fractals`` and ``fractal-leaves``); first accepted draw."""
    rng = _rng(seed, _S_IFS, class_idx)
    for _ in range(10_000):
        ifs = sample_ifs(rng)
        fill, aspect = filling_rate(*chaos_game(ifs, 20_000, rng)[:2])
        if FILL_RANGE[0] <= fill <= FILL_RANGE[1] and aspect >= MIN_ASPECT:
            return ifs
    raise RuntimeError(f"no acceptable IFS for seed {seed} class {class_idx}")  # pragma: no cover


@dataclass(frozen=True)
class FractalLook:
    """Per-image rendering choices for a fractal (all resolution-free)."""

    ifs: IFS
    colours: np.ndarray  # (K, 3) one colour per map
    extent: float        # the attractor's longest side as a fraction of the image side
    flip: tuple[bool, bool]
    shift: tuple[float, float]  # in [0, 1]: where the box sits inside the free room


def sample_fractal_look(ifs: IFS, rng: np.random.Generator, extent: tuple[float, float]) -> FractalLook:
    k = len(ifs.p)
    hue = rng.uniform() + rng.uniform(-0.2, 0.2, k)
    colours = hsv_to_rgb(hue, rng.uniform(0.55, 1.0, k), rng.uniform(0.75, 1.0, k))
    return FractalLook(ifs=jitter_ifs(ifs, rng), colours=colours, extent=float(rng.uniform(*extent)),
                       flip=(bool(rng.integers(2)), bool(rng.integers(2))),
                       shift=(float(rng.uniform()), float(rng.uniform())))


def draw_fractal(look: FractalLook, grid: int, rng: np.random.Generator,
                 density: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(colour GxGx3, coverage GxG in {0,1}) of a chaos-game render with ``density * G^2`` points, holes closed.

    The attractor's bounding box is scaled so its longer side is ``look.extent`` of the canvas, flipped, and
    placed at ``look.shift`` of the free room. A cell's colour is the mean colour of its points (colour =
    producing map), shaded by ``0.55 + 0.45 log(1+n)/log(1+n_max)`` so dense parts are brighter.
    """
    x, y, idx = chaos_game(look.ifs, int(density * grid * grid), rng)
    bounds = [(v.min(), v.max()) for v in (x, y)]
    scale = look.extent / max(max(hi - lo for lo, hi in bounds), 1e-12)
    flat = np.zeros(len(x), np.int64)
    for ax, (v, (lo, hi)) in enumerate(zip((x, y), bounds)):
        half = (hi - lo) * scale / 2
        q = (v - (lo + hi) / 2) * scale
        if look.flip[ax]:
            q = -q
        q += half + look.shift[ax] * (1 - 2 * half)  # now in [0, 1]
        flat += np.clip((q * grid).astype(np.int64), 0, grid - 1) * (grid if ax else 1)
    k = len(look.colours)
    per_map = np.bincount(flat * k + idx, minlength=grid * grid * k).reshape(grid * grid, k).astype(np.float32)
    count = np.bincount(flat, minlength=grid * grid).astype(np.float32)
    rgb = per_map @ look.colours.astype(np.float32) / np.maximum(count, 1)[:, None]
    shade = 0.55 + 0.45 * np.log1p(count) / np.log1p(max(count.max(), 1.0))
    cover = (count > 0).astype(np.float32).reshape(grid, grid)
    return close_holes((rgb * shade[:, None]).reshape(grid, grid, 3), cover)


def _neighbourhood(a: np.ndarray, radius: int, op: Any, outside: float = 0.0) -> np.ndarray:
    """Reduce each pixel's (2 radius + 1)^2 square neighbourhood with a binary ufunc; pixels beyond the edge
    count as ``outside``."""
    g = a.shape[0]
    pad = np.pad(a, [(radius, radius), (radius, radius)] + [(0, 0)] * (a.ndim - 2), constant_values=outside)
    out = pad[:g, :g].copy()
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            if dy or dx:
                op(out, pad[dy:dy + g, dx:dx + g], out=out)
    return out


def dilate(mask: np.ndarray, radius: int, outside: float = 0.0) -> np.ndarray:
    """Binary dilation of a GxG {0,1} mask by a (2 radius + 1)^2 square (beyond the edge = ``outside``)."""
    return _neighbourhood(mask, radius, np.maximum, outside)


def close_holes(rgb: np.ndarray, cover: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Morphological closing (3x3 dilation, then erosion) of the coverage; filled cells take the mean colour of
    their covered 3x3 neighbours (every filled cell has one, since the dilation reached it)."""
    grown = dilate(np.pad(cover, 1), 1)  # padded so the dilation can extend past the edge ...
    closed = (1.0 - dilate(1.0 - grown, 1, outside=1.0))[1:-1, 1:-1]  # ... and erosion does not eat the edge
    total = _neighbourhood(rgb * cover[..., None], 1, np.add)
    weight = _neighbourhood(cover, 1, np.add)
    fill = (closed > 0) & (cover == 0)
    rgb = rgb.copy()
    rgb[fill] = total[fill] / weight[fill][:, None]
    return rgb, closed


# ----------------------------------------------------------------------------------------- dead leaves
def powerlaw_radii(rng: np.random.Generator, n: int, rmin: float, rmax: float, alpha: float = LEAF_ALPHA) -> np.ndarray:
    """Radii with density ``p(r) = C r^-alpha`` on ``[rmin, rmax]`` (alpha != 1) by inverting the CDF.

    ``F(r) = (rmin^(1-a) - r^(1-a)) / (rmin^(1-a) - rmax^(1-a))``, so ``r = (rmin^(1-a) - u (rmin^(1-a) -
    rmax^(1-a)))^(1/(1-a))`` with ``u ~ U(0, 1)``.
    """
    e = 1.0 - alpha
    u = rng.uniform(size=n)
    return (rmin**e - u * (rmin**e - rmax**e)) ** (1.0 / e)


def powerlaw_second_moment(rmin: float, rmax: float, alpha: float = LEAF_ALPHA) -> float:
    """``E[r^2]`` under ``p(r) ~ r^-alpha`` on ``[rmin, rmax]`` (alpha != 1): ``C/(3-a) (rmax^(3-a) - rmin^(3-a))``,
    or ``C ln(rmax/rmin)`` at alpha = 3, with ``C = (a-1) / (rmin^(1-a) - rmax^(1-a))``."""
    c = (alpha - 1.0) / (rmin ** (1.0 - alpha) - rmax ** (1.0 - alpha))
    if abs(alpha - 3.0) < 1e-9:
        return c * math.log(rmax / rmin)
    return c / (3.0 - alpha) * (rmax ** (3.0 - alpha) - rmin ** (3.0 - alpha))


@dataclass(frozen=True)
class LeavesStyle:
    """Statistics of one dead-leaves family (a class, or a random background)."""

    base_hue: float
    hues: np.ndarray             # palette hues around base_hue
    sat: tuple[float, float]
    val: tuple[float, float]
    hue_jitter: float
    p_disc: float                # probability a leaf is a disc (else a rotated rectangle)
    max_aspect: float            # rectangles: half sides r and r / a, a ~ U(1, max_aspect)
    rmin: float
    rmax: float
    n_leaves: int


def sample_leaves_style(rng: np.random.Generator, base_hue: float, *, dim: float = 1.0) -> LeavesStyle:
    """A palette around ``base_hue`` and shape statistics; ``n_leaves`` covers the canvas ``LEAF_COVER`` times.

    Expected leaf area ``E[r^2] (p pi + (1-p) 4 E[1/a])`` with ``E[1/a] = ln(A)/(A-1)`` for ``a ~ U(1, A)``;
    leaf centres fall in ``[-0.1, 1.1]^2`` (area 1.44).
    """
    n_col = int(rng.integers(2, 6))
    hues = base_hue + rng.normal(0, rng.uniform(0.02, 0.1), n_col)
    sc, vc = rng.uniform(0.25, 0.9), rng.uniform(0.4, 0.85) * dim
    p_disc, max_aspect = float(rng.uniform()), float(rng.uniform(1.0, 4.0))
    rmax = float(rng.uniform(0.2, 0.5))
    inv_a = math.log(max_aspect) / (max_aspect - 1) if max_aspect > 1 + 1e-9 else 1.0
    area = powerlaw_second_moment(LEAF_RMIN, rmax) * (p_disc * math.pi + (1 - p_disc) * 4 * inv_a)
    return LeavesStyle(base_hue=base_hue, hues=hues, sat=(max(sc - 0.15, 0.0), min(sc + 0.15, 1.0)),
                       val=(max(vc - 0.2, 0.05), min(vc + 0.2, 1.0)), hue_jitter=float(rng.uniform(0.01, 0.04)),
                       p_disc=p_disc, max_aspect=max_aspect, rmin=LEAF_RMIN, rmax=rmax,
                       n_leaves=min(MAX_LEAVES, math.ceil(LEAF_COVER * 1.44 / area)))


@lru_cache(maxsize=4096)
def class_leaves_style(seed: int, class_idx: int) -> LeavesStyle:
    """Class ``c``'s style; base hues follow the golden-ratio sequence so nearby classes differ most."""
    offset = _rng(seed, _S_LEAVES_HUE).uniform()
    return sample_leaves_style(_rng(seed, _S_LEAVES_CLASS, class_idx), (offset + class_idx * _GOLDEN) % 1.0)


def sample_leaves_scene(style: LeavesStyle, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Leaves bottom-to-top: centre (n,2) in [-0.1,1.1], radius (n,), disc (n,) bool, aspect, angle, rgb (n,3);
    plus the background colour."""
    n = style.n_leaves
    pick = rng.integers(len(style.hues), size=n + 1)
    rgb = hsv_to_rgb(style.hues[pick] + rng.normal(0, style.hue_jitter, n + 1),
                     rng.uniform(*style.sat, n + 1), rng.uniform(*style.val, n + 1))
    return {"centre": rng.uniform(-0.1, 1.1, (n, 2)), "radius": powerlaw_radii(rng, n, style.rmin, style.rmax),
            "disc": rng.uniform(size=n) < style.p_disc, "aspect": rng.uniform(1.0, style.max_aspect, n),
            "angle": rng.uniform(0, np.pi, n), "rgb": rgb[1:], "background": rgb[0]}


def draw_leaves(scene: dict[str, np.ndarray], grid: int) -> np.ndarray:
    """Paint the scene (painter's algorithm, later leaves on top) on a GxG canvas; float RGB in [0, 1]."""
    img = Image.new("RGB", (grid, grid), tuple(int(round(c * 255)) for c in scene["background"]))
    draw = ImageDraw.Draw(img)
    c = scene["centre"] * grid
    r = scene["radius"] * grid
    colours = [tuple(v) for v in np.rint(scene["rgb"] * 255).astype(int).tolist()]
    ca, sa = np.cos(scene["angle"]), np.sin(scene["angle"])
    hw, hh = r, r / scene["aspect"]
    corners = np.stack([c[:, 0] + sx * hw * ca - sy * hh * sa for sx, sy in ((1, 1), (-1, 1), (-1, -1), (1, -1))]
                       + [c[:, 1] + sx * hw * sa + sy * hh * ca for sx, sy in ((1, 1), (-1, 1), (-1, -1), (1, -1))], 1)
    boxes = np.stack([c[:, 0] - r, c[:, 1] - r, c[:, 0] + r, c[:, 1] + r], 1).tolist()
    corners_l, disc = corners.tolist(), scene["disc"].tolist()
    for i in range(len(r)):
        if disc[i]:
            draw.ellipse(boxes[i], fill=colours[i])
        else:
            k = corners_l[i]
            draw.polygon([(k[0], k[4]), (k[1], k[5]), (k[2], k[6]), (k[3], k[7])], fill=colours[i])
    return np.asarray(img, dtype=np.float32) / np.float32(255.0)


# ----------------------------------------------------------------------------------------- rendering
def supersample(size: int) -> int:
    """Render at ``size * supersample(size)`` px (>= 128 where possible, at most 4x), then box-downsample."""
    return max(1, min(4, math.ceil(128 / size)))


def _downsample(x: np.ndarray, f: int) -> np.ndarray:
    if f == 1:
        return x
    g, w = x.shape[0] // f, x.shape[1]
    rows = x.reshape(g, f, w, -1).sum(1)  # (g, W, C): sum the f rows of each block, then the f columns
    return (rows.reshape(g, g, f, -1).sum(2) / (f * f)).reshape(g, g, *x.shape[2:])


def render(kind: str, class_idx: int, index: int, *, size: int, seed: int = 0, num_classes: int) -> np.ndarray:
    """Image ``index`` of class ``class_idx`` as an HxWx3 uint8 array (H = W = ``size``).

    A pure function of its arguments (``num_classes`` is only checked: ``0 <= class_idx < num_classes``).
    """
    kind = _check_kind(kind)
    num_classes = _check_int("num_classes", num_classes, 1)
    class_idx = _check_int("class_idx", class_idx, 0)
    if class_idx >= num_classes:
        raise MimlabError(f"class_idx must be < num_classes ({num_classes}), got {class_idx}")
    index = _check_int("index", index, 0)
    size = _check_int("size", size, MIN_SIZE)
    seed = _check_int("seed", seed, 0)
    return _render(kind, class_idx, index, size, seed)


def _render(kind: str, class_idx: int, index: int, size: int, seed: int) -> np.ndarray:
    code = _KIND_CODE[kind]
    params = _rng(seed, _S_IMAGE, code, class_idx, index)
    points = _rng(seed, _S_POINTS, code, class_idx, index)
    grid = size * supersample(size)
    if kind == "deadleaves":
        canvas = draw_leaves(sample_leaves_scene(class_leaves_style(seed, class_idx), params), grid)
    elif kind == "fractals":
        look = sample_fractal_look(class_ifs(seed, class_idx), params, extent=(0.6, 0.95))
        rgb, alpha = draw_fractal(look, grid, points)
        canvas = rgb * alpha[..., None]
    else:  # fractal-leaves: class-free background, class-bearing fractal
        style = sample_leaves_style(params, float(params.uniform()), dim=0.8)
        scene = sample_leaves_scene(style, params)
        look = sample_fractal_look(class_ifs(seed, class_idx), params, extent=(0.55, 0.9))
        background = draw_leaves(scene, grid)
        rgb, alpha = draw_fractal(look, grid, points)
        rim = dilate(alpha, max(1, grid // 96))  # a thin dark rim keeps the object readable on any background
        canvas = background * (1 - 0.6 * rim[..., None]) * (1 - alpha[..., None]) + rgb * alpha[..., None]
    out = _downsample(canvas.astype(np.float32), grid // size)
    return np.clip(np.rint(out * np.float32(255.0)), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------- datasets
def _render_items(kind: str, items: Sequence[tuple[int, int]], size: int, seed: int) -> np.ndarray:
    out = np.empty((len(items), size, size, 3), np.uint8)
    for j, (c, i) in enumerate(items):
        out[j] = _render(kind, c, i, size, seed)
    return out


def _pool(workers: int) -> ProcessPoolExecutor:
    # forkserver: no fork of a process that may hold threads (torch, tqdm); workers re-import only this module.
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx)


def _chunks(seq: Sequence[Any], n: int) -> list[Sequence[Any]]:
    return [seq[i:i + n] for i in range(0, len(seq), n)]


class SyntheticImages:
    """Map-style dataset (no torch needed): item ``i`` is (PIL RGB image, label ``i // per_class``).

    Item i shows class ``i // per_class``, image index ``offset + i % per_class``; a held-out split uses another
    ``offset`` (e.g. ``offset = per_class`` of the training split) to get disjoint images of the same classes.
    """

    def __init__(self, kind: str = DEFAULT_KIND, *, classes: int, per_class: int, size: int, seed: int = 0,
                 offset: int = 0) -> None:
        self.kind = _check_kind(kind)
        self.classes = _check_int("classes", classes, 1)
        self.per_class = _check_int("per_class", per_class, 1)
        self.size = _check_int("size", size, MIN_SIZE)
        self.seed = _check_int("seed", seed, 0)
        self.offset = _check_int("offset", offset, 0)

    def __len__(self) -> int:
        return self.classes * self.per_class

    def item(self, i: int) -> tuple[int, int]:
        """(class index, image index) of item ``i``."""
        n = len(self)
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"index must be an integer, got {type(i).__name__}")
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} images")
        i = int(i) % n
        return i // self.per_class, self.offset + i % self.per_class

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        c, k = self.item(i)
        return Image.fromarray(_render(self.kind, c, k, self.size, self.seed), "RGB"), c

    def labels(self) -> np.ndarray:
        return np.repeat(np.arange(self.classes, dtype=np.int64), self.per_class)

    def to_array(self, workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """All images as ``(N, H, W, 3)`` uint8 and labels ``(N,)`` int64; identical for any ``workers``."""
        workers = _check_int("workers", workers, 1)
        items = [self.item(i) for i in range(len(self))]
        if workers == 1 or len(items) < 2:
            return _render_items(self.kind, items, self.size, self.seed), self.labels()
        parts = _chunks(items, max(1, -(-len(items) // (4 * workers))))
        with _pool(workers) as pool:
            arrays = list(pool.map(_render_items, [self.kind] * len(parts), parts, [self.size] * len(parts),
                                   [self.seed] * len(parts)))
        return np.concatenate(arrays), self.labels()


# ----------------------------------------------------------------------------------------- image folders
_MATCH_KEYS = ("format", "generator_version", "kind", "classes", "per_class", "val_per_class", "size", "seed")


def class_dir_name(class_idx: int, classes: int) -> str:
    """``c0000``-style, zero-padded to at least 4 digits so sorted order is class order."""
    return f"c{class_idx:0{max(4, len(str(classes - 1)))}d}"


def _write_items(kind: str, jobs: Sequence[tuple[int, int, str]], size: int, seed: int) -> int:
    """Render and save each (class, index, path) as PNG via a temp file + rename; existing files are kept."""
    done = 0
    for c, i, path in jobs:
        if not os.path.exists(path):
            tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
            Image.fromarray(_render(kind, c, i, size, seed), "RGB").save(tmp, format="PNG")
            os.replace(tmp, path)
        done += 1
    return done


def _check_out_dir(out: Path, meta: dict[str, Any]) -> None:
    if out.exists() and not out.is_dir():
        raise MimlabError(f"out {out} exists and is not a directory")
    if not out.exists() or not any(out.iterdir()):
        return
    meta_path = out / "dataset.json"
    if not meta_path.is_file():
        raise MimlabError(f"refusing to write into non-empty directory {out}: it has no dataset.json "
                          "(choose a new or empty directory)")
    try:
        old = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise MimlabError(f"{meta_path} is not readable JSON ({e}); choose a new or empty directory") from e
    diff = [k for k in _MATCH_KEYS if not isinstance(old, dict) or old.get(k) != meta[k]]
    if diff:
        shown = ", ".join(f"{k}: {old.get(k) if isinstance(old, dict) else None!r} != {meta[k]!r}" for k in diff)
        raise MimlabError(f"refusing to write into {out}: its dataset.json describes a different dataset ({shown})")


def write_imagefolder(kind: str, out: str | Path, *, classes: int, per_class: int, size: int, seed: int = 0,
                      val_per_class: int = 0, workers: int = 1, progress: bool = True) -> Path:
    """Write PNGs in torchvision ImageFolder layout and ``dataset.json``; returns ``out``.

    ``out/c0000/000000.png ...`` when ``val_per_class == 0``, else ``out/train/c0000/...`` (image indices
    ``0..per_class-1``) and ``out/val/c0000/...`` (indices ``per_class..per_class+val_per_class-1``). A directory
    that already holds a matching dataset.json is completed (existing PNGs are kept: they are written by
    rename, so never partial); any other non-empty directory is refused.
    """
    from mimlab import __version__
    from mimlab.utils.io import atomic_write_json

    kind = _check_kind(kind)
    classes = _check_int("classes", classes, 1)
    per_class = _check_int("per_class", per_class, 1)
    size = _check_int("size", size, MIN_SIZE)
    seed = _check_int("seed", seed, 0)
    val_per_class = _check_int("val_per_class", val_per_class, 0)
    workers = _check_int("workers", workers, 1)
    out = Path(out)
    splits = [("", 0, per_class)] if val_per_class == 0 else [("train", 0, per_class),
                                                              ("val", per_class, val_per_class)]
    meta: dict[str, Any] = {
        "format": "mimlab-synthetic-imagefolder", "generator_version": GENERATOR_VERSION, "kind": kind,
        "classes": classes, "per_class": per_class, "val_per_class": val_per_class, "size": size, "seed": seed,
        "layout": "flat" if val_per_class == 0 else "train/val",
        "class_dir": "c{class:0%dd}" % max(4, len(str(classes - 1))), "image_file": "{index:06d}.png",
        "index_ranges": {name or "all": [start, start + count] for name, start, count in splits},
        "counts": {name or "all": classes * count for name, start, count in splits},
        "mimlab_version": __version__, "numpy_version": np.__version__, "pillow_version": PIL.__version__,
        "complete": False,
    }
    _check_out_dir(out, meta)
    jobs: list[tuple[int, int, str]] = []
    for name, start, count in splits:
        for c in range(classes):
            d = out / name / class_dir_name(c, classes) if name else out / class_dir_name(c, classes)
            d.mkdir(parents=True, exist_ok=True)
            jobs += [(c, i, str(d / f"{i:06d}.png")) for i in range(start, start + count)]
    atomic_write_json(out / "dataset.json", meta)
    t0 = time.perf_counter()
    bar = _progress(len(jobs), f"{kind} {size}px", progress)
    try:
        if workers == 1:
            for part in _chunks(jobs, 16):
                bar.update(_write_items(kind, part, size, seed))
        else:
            with _pool(workers) as pool:
                futures = [pool.submit(_write_items, kind, part, size, seed) for part in _chunks(jobs, 32)]
                for f in as_completed(futures):
                    bar.update(f.result())
    finally:
        bar.close()
    meta.update(complete=True, seconds=round(time.perf_counter() - t0, 3))
    atomic_write_json(out / "dataset.json", meta)
    return out


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img")

