"""Articulated stick figures with 13 keypoints, written as images + COCO keypoint JSON.

Each figure is a person-like skeleton facing the camera: a head, shoulders and hips on a torso, two-segment arms
and legs with random joint angles, a random global tilt and scale, drawn with thick limbs over a textured
background (plus a few clutter strokes). As in COCO, a figure's *left* side is the one on the image's right (the
figure faces the viewer), so the labelling is mirror-consistent and flip testing is valid.

Layout (the COCO 2017 layout): `OUT/train/*.png`, `OUT/val/*.png`,
`OUT/annotations/person_keypoints_{train,val}.json`. Keypoints are in COCO's pixel-index convention (the centre
of pixel (i, j) is the point x=j, y=i); every keypoint inside the image has v=2, others x=y=v=0.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mimlab.errors import ConfigError
from mimlab.data.downstream.common import (check_positive, prepare_out, rgb255, rng_for, textured_background,
                                              progress_bar, to_uint8)

KEYPOINT_NAMES = ["head", "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist",
                  "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle"]
# 1-based, as in COCO's `skeleton`
SKELETON = [[1, 2], [1, 3], [2, 3], [2, 4], [4, 6], [3, 5], [5, 7], [2, 8], [3, 9], [8, 9], [8, 10], [10, 12],
            [9, 11], [11, 13]]
SUPERSAMPLE = 4


def figure_keypoints(rng: np.random.Generator) -> np.ndarray:
    """(13, 2) keypoints of one figure in body units (height about 1, neck at the origin, y down)."""
    kp = np.zeros((13, 2))
    kp[0] = (0.0, -0.17)
    kp[1], kp[2] = (0.13, 0.0), (-0.13, 0.0)  # left shoulder on the image right
    kp[7], kp[8] = (0.09, 0.4), (-0.09, 0.4)

    def limb(start: np.ndarray, a1: float, a2: float, l1: float, l2: float) -> tuple[np.ndarray, np.ndarray]:
        mid = start + l1 * np.array([np.sin(a1), np.cos(a1)])
        end = mid + l2 * np.array([np.sin(a2), np.cos(a2)])
        return mid, end

    for side, (sh, el, wr) in ((+1, (1, 3, 5)), (-1, (2, 4, 6))):
        a1 = side * rng.uniform(0.1, 2.6)  # angle from straight down, outwards positive
        a2 = a1 + side * rng.uniform(-1.2, 1.6)
        kp[el], kp[wr] = limb(kp[sh], a1, a2, 0.2, 0.19)
    for side, (hp, kn, an) in ((+1, (7, 9, 11)), (-1, (8, 10, 12))):
        a1 = side * rng.uniform(-0.15, 0.8)
        a2 = a1 - side * rng.uniform(-0.3, 0.9)
        kp[kn], kp[an] = limb(kp[hp], a1, a2, 0.26, 0.25)
    return kp


def draw_figure(draw: ImageDraw.ImageDraw, kp: np.ndarray, scale: float, rng: np.random.Generator) -> None:
    """Draw the figure whose keypoints `kp` are already in (supersampled) pixel coordinates."""
    limb_col = rgb255(rng.uniform(0.05, 0.95, 3))
    torso_col = rgb255(rng.uniform(0.05, 0.95, 3))
    width = max(2, int(round(0.07 * scale)))
    torso = [kp[1], kp[2], kp[8], kp[7]]
    draw.polygon([tuple(p) for p in torso], fill=torso_col)
    for a, b in ((1, 3), (3, 5), (2, 4), (4, 6), (7, 9), (9, 11), (8, 10), (10, 12)):
        draw.line([tuple(kp[a]), tuple(kp[b])], fill=limb_col, width=width)
    r = width * 0.7
    for j in range(1, 13):
        draw.ellipse([kp[j][0] - r, kp[j][1] - r, kp[j][0] + r, kp[j][1] + r], fill=limb_col)
    hr = 0.09 * scale
    draw.ellipse([kp[0][0] - hr, kp[0][1] - hr, kp[0][0] + hr, kp[0][1] + hr], fill=torso_col)
    draw.line([tuple(kp[0]), tuple((kp[1] + kp[2]) / 2)], fill=torso_col, width=width)


def render_image(size: int, n_figures: int, rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """Render one image; returns (uint8 HxWx3, list of (13, 2) keypoints in pixel-index coordinates)."""
    s = size * SUPERSAMPLE
    img = Image.fromarray(to_uint8(textured_background(rng, s, s)))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(2, 6)):  # clutter strokes
        p = rng.uniform(0, s, 4)
        draw.line(list(p), fill=rgb255(rng.random(3)), width=int(rng.integers(1, 3) * SUPERSAMPLE))
    all_kp = []
    for _ in range(n_figures):
        height = rng.uniform(0.4, 0.85) * s
        body = figure_keypoints(rng)
        t = rng.uniform(-0.45, 0.45)
        rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
        pts = body @ rot.T * height
        head_r = 0.09 * height
        lo = np.minimum(pts.min(0), pts[0] - head_r) - 2
        hi = np.maximum(pts.max(0), pts[0] + head_r) + 2
        span = hi - lo
        if np.any(span >= s):
            continue
        offset = np.array([rng.uniform(-lo[0], s - hi[0]), rng.uniform(-lo[1], s - hi[1])])
        pts = pts + offset
        draw_figure(draw, pts, height, rng)
        # supersampled continuous coordinates -> pixel-index coordinates of the final image
        all_kp.append(pts / SUPERSAMPLE - 0.5)
    out = np.asarray(img.resize((size, size), Image.BOX))
    return out, all_kp


def _annotation(ann_id: int, image_id: int, kp: np.ndarray, size: int) -> dict:
    inside = (kp[:, 0] >= 0) & (kp[:, 0] <= size - 1) & (kp[:, 1] >= 0) & (kp[:, 1] <= size - 1)
    flat = []
    for (x, y), v in zip(kp, inside):
        flat += [round(float(x), 2), round(float(y), 2), 2] if v else [0, 0, 0]
    vis = kp[inside]
    margin = 0.06 * (vis[:, 1].max() - vis[:, 1].min() + 1)
    x0, y0 = max(0.0, vis[:, 0].min() - margin), max(0.0, vis[:, 1].min() - margin)
    x1, y1 = min(size - 1.0, vis[:, 0].max() + margin), min(size - 1.0, vis[:, 1].max() + margin)
    w, h = x1 - x0 + 1, y1 - y0 + 1
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
            "bbox": [round(x0, 2), round(y0, 2), round(w, 2), round(h, 2)], "area": round(w * h, 2),
            "num_keypoints": int(inside.sum()), "keypoints": flat}


def generate_keypoints(out: str | Path, *, train_images: int = 600, val_images: int = 100, size: int = 64,
                       max_figures: int = 2, seed: int = 0, overwrite: bool = False,
                       progress: bool = False) -> dict:
    """Write the stick-figure keypoint dataset in the COCO layout; returns its parameters."""
    check_positive(train_images=train_images, val_images=val_images, size=size, max_figures=max_figures)
    if size < 32:
        raise ConfigError("size", f"must be >= 32 px for figures to be drawable (got {size})")
    out = prepare_out(out, overwrite, ("train", "val", "annotations"))
    bar = progress_bar(train_images + val_images, "keypoints", progress, unit="img")
    category = {"id": 1, "name": "figure", "supercategory": "figure", "keypoints": KEYPOINT_NAMES,
                "skeleton": SKELETON}
    ann_id = 1
    for split_id, (split, n) in enumerate((("train", train_images), ("val", val_images))):
        (out / split).mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i in range(n):
            bar.update(1)
            rng = rng_for(seed, split_id, i)
            img, kps = render_image(size, int(rng.integers(1, max_figures + 1)), rng)
            name = f"{i:06d}.png"
            Image.fromarray(img).save(out / split / name)
            image_id = i + 1
            images.append({"id": image_id, "file_name": name, "width": size, "height": size})
            for kp in kps:
                anns.append(_annotation(ann_id, image_id, kp, size))
                ann_id += 1
        coco = {"info": {"description": "mimlab synthetic stick figures", "seed": seed}, "images": images,
                "annotations": anns, "categories": [category]}
        (out / "annotations").mkdir(exist_ok=True)
        (out / "annotations" / f"person_keypoints_{split}.json").write_text(json.dumps(coco))
    meta = {"kind": "keypoints", "format": "coco", "num_keypoints": len(KEYPOINT_NAMES), "train_images": train_images,
            "val_images": val_images, "size": size, "max_figures": max_figures, "seed": seed}
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    bar.close()
    return meta
