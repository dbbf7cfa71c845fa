"""Layered indoor scenes with exact depth maps, written in the NYUv2 (BTS-style) layout.

A pinhole camera (focal `f` px, principal point at the image centre, height `h` above the floor) looks
horizontally into a box-shaped room: floor and ceiling are planes, so their depth at image row v is
`Z = f * h / (v - v0)` (floor, below the horizon row v0) and `Z = f * (H_ceiling - h) / (v0 - v)` (ceiling),
clipped by a back wall at depth `Z_wall`. Fronto-parallel boxes stand on the floor at random depths `Z_i` (their
base at row `v0 + f * h / Z_i`, their size `f * size / Z_i`), and a few discs float in the air; they are painted
far to near, so occlusion is exact. Surfaces carry textures and a depth haze (colour blends towards a fog
colour as 1 - exp(-Z / 12 m)). A few small holes are marked invalid (depth 0), as the Kinect leaves them.

Layout: `OUT/{train,val}/rgb_NNNNN.png` (RGB) and `OUT/{train,val}/depth_NNNNN.png` (uint16, millimetres,
0 = invalid), with split files `OUT/train.txt` and `OUT/val.txt` whose lines are `rgb_path depth_path focal`
(paths relative to OUT), as in the NYUv2 files used by BTS and the Monocular-Depth-Estimation-Toolbox.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from mimlab.errors import ConfigError
from mimlab.data.downstream.common import check_positive, prepare_out, rng_for, smooth_noise, to_uint8, progress_bar

MAX_DEPTH_M = 10.0


def render_scene(width: int, height: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """Returns (uint8 HxWx3 image, float32 HxW depth in metres with 0 = invalid, focal length in px)."""
    f = 0.8 * width * rng.uniform(0.9, 1.1)
    cam_h = rng.uniform(1.0, 1.6)
    ceil_h = rng.uniform(2.5, 3.0)
    z_wall = rng.uniform(5.0, 9.5)
    v0 = height / 2 + rng.uniform(-0.1, 0.1) * height  # horizon row (camera pitch)
    rows = np.arange(height, dtype=np.float64) + 0.5
    cols = np.arange(width, dtype=np.float64) + 0.5
    vv, uu = np.meshgrid(rows, cols, indexing="ij")
    depth = np.full((height, width), z_wall)
    with np.errstate(divide="ignore", invalid="ignore"):
        z_floor = np.where(vv > v0, f * cam_h / (vv - v0), np.inf)
        z_ceil = np.where(vv < v0, f * (ceil_h - cam_h) / (v0 - vv), np.inf)
    depth = np.minimum(depth, np.minimum(z_floor, z_ceil))
    surface = np.where(depth == z_floor, 0, np.where(depth == z_ceil, 1, 2))
    # textures: floor tiles in world coordinates, noisy walls
    cols_rgb = rng.uniform(0.2, 0.9, (3, 3))
    img = cols_rgb[surface]
    x_world = (uu - width / 2) * depth / f
    tiles = ((np.floor(x_world / 0.5) + np.floor(depth / 0.5)) % 2)[..., None]
    img = np.where((surface == 0)[..., None], img * (0.8 + 0.2 * tiles), img)
    wall_tex = smooth_noise(rng, height, width, 8)[..., None]
    img = np.where((surface == 2)[..., None], img * (0.75 + 0.25 * wall_tex), img)
    # objects, far to near
    n_obj = int(rng.integers(2, 6))
    objs = []
    for _ in range(n_obj):
        z = rng.uniform(1.2, z_wall - 0.3)
        objs.append(("box" if rng.random() < 0.7 else "disc", z))
    for kind, z in sorted(objs, key=lambda o: -o[1]):
        colour = rng.uniform(0.05, 0.95, 3)
        x_c = rng.uniform(-0.6, 0.6) * width * z / f  # world x of the object centre
        u_c = width / 2 + f * x_c / z
        if kind == "box":
            w_m, h_m = rng.uniform(0.3, 1.2), rng.uniform(0.3, 1.5)
            v_base = v0 + f * cam_h / z
            mask = (np.abs(uu - u_c) <= f * w_m / z / 2) & (vv <= v_base) & (vv >= v_base - f * h_m / z)
            shade = 0.85 + 0.15 * smooth_noise(rng, height, width, 4)[..., None]
        else:
            r_m = rng.uniform(0.15, 0.5)
            v_c = v0 - f * rng.uniform(-0.5, ceil_h - cam_h - 0.6) / z
            mask = (uu - u_c) ** 2 + (vv - v_c) ** 2 <= (f * r_m / z) ** 2
            shade = 1.0 - 0.3 * np.clip(((uu - u_c) ** 2 + (vv - v_c) ** 2) / (f * r_m / z) ** 2, 0, 1)[..., None]
        mask &= depth > z
        depth = np.where(mask, z, depth)
        img = np.where(mask[..., None], colour * shade, img)
    fog = np.array([0.75, 0.75, 0.8])
    a = np.exp(-depth / 12.0)[..., None]
    img = img * a + fog * (1 - a) + rng.normal(0, 0.015, img.shape)
    depth = np.minimum(depth, MAX_DEPTH_M).astype(np.float32)
    for _ in range(int(rng.integers(0, 3))):  # sensor holes
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(1, 3)
        depth[(vv - cy) ** 2 + (uu - cx) ** 2 <= r * r] = 0.0
    return to_uint8(img), depth, float(f)


def generate_depth(out: str | Path, *, train_images: int = 800, val_images: int = 100, width: int = 64,
                   height: int = 48, seed: int = 0, overwrite: bool = False,
                   progress: bool = False) -> dict:
    """Write the layered-scene depth dataset in the NYUv2 layout; returns its parameters."""
    check_positive(train_images=train_images, val_images=val_images, width=width, height=height)
    for name, value in (("width", width), ("height", height)):
        if value < 16:
            raise ConfigError(name, f"must be >= 16 px (got {width}x{height})")
    out = prepare_out(out, overwrite, ("train", "val", "train.txt", "val.txt"))
    bar = progress_bar(train_images + val_images, "depth", progress, unit="img")
    for split_id, (split, n) in enumerate((("train", train_images), ("val", val_images))):
        (out / split).mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(n):
            bar.update(1)
            img, depth, f = render_scene(width, height, rng_for(seed, split_id, i))
            rgb, dpt = f"{split}/rgb_{i:05d}.png", f"{split}/depth_{i:05d}.png"
            Image.fromarray(img).save(out / rgb)
            Image.fromarray(np.round(depth * 1000.0).astype(np.uint16)).save(out / dpt)
            lines.append(f"{rgb} {dpt} {f:.4f}")
        (out / f"{split}.txt").write_text("\n".join(lines) + "\n")
    meta = {"kind": "depth", "format": "nyu", "depth_scale": 1000.0, "max_depth": MAX_DEPTH_M,
            "train_images": train_images, "val_images": val_images, "width": width, "height": height, "seed": seed}
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    bar.close()
    return meta
