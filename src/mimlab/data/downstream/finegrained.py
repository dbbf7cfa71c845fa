"""Fine-grained classification: one base shape (a bird-like figure), classes differ only by small details.

Every image shows the same kind of object -- an elliptic body with a head and a tail, of random body colour, size,
position and facing direction, over a random textured background. The class is a combination of two small details:
the colour of a few small spots on the body (red, blue or yellow; each spot is a few pixels wide) and the shape of
the tail (forked, fan or pointed). Body tone (a muted colour), eye colour, size, pose and background are
independent of the class, so only the details identify it.

Written as an ImageFolder tree: `OUT/{train,val}/<class>/<index>.png`, plus `OUT/dataset.json` (parameters).
"""
from __future__ import annotations

import json
from itertools import product
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mimlab.errors import ConfigError
from mimlab.data.downstream.common import (check_positive, prepare_out, rgb255, rng_for, textured_background,
                                              progress_bar, to_uint8)

EYE_COLOURS = ((0.95, 0.1, 0.1), (0.1, 0.3, 1.0), (1.0, 0.9, 0.05))
SPOT_COLOURS = {"red": (0.95, 0.1, 0.1), "blue": (0.1, 0.3, 1.0), "yellow": (1.0, 0.9, 0.05)}
TAILS = ("fork", "fan", "point")
SUPERSAMPLE = 4


def class_names(num_classes: int) -> list[str]:
    combos = [f"{spot}_spots-{tail}_tail" for tail, spot in product(TAILS, SPOT_COLOURS)]
    if not 2 <= num_classes <= len(combos):
        raise ConfigError("num_classes", f"must be between 2 and {len(combos)} (got {num_classes})")
    return combos[:num_classes]


def draw_bird(size: int, class_name: str, rng: np.random.Generator) -> np.ndarray:
    """One uint8 RGB image (size x size) of a bird of class `class_name`."""
    spot, tail = class_name.split("-")[0][: -len("_spots")], class_name.split("-")[1][: -len("_tail")]
    s = size * SUPERSAMPLE
    bg = Image.fromarray(to_uint8(textured_background(rng, s, s)))
    draw = ImageDraw.Draw(bg)
    length = s * rng.uniform(0.7, 0.85)  # body + tail extent
    cx = s / 2 + rng.uniform(-0.06, 0.06) * s
    cy = s / 2 + rng.uniform(-0.15, 0.15) * s
    facing = 1 if rng.random() < 0.5 else -1  # head to the right (+1) or left (-1)
    body_col = (rng.uniform(0.25, 0.75) + rng.uniform(-0.12, 0.12, 3)).clip(0, 1)  # muted tone
    tail_col = (body_col * rng.uniform(0.6, 0.9)).clip(0, 1)
    bw, bh = 0.32 * length, 0.16 * length  # body half-axes
    bx = cx - facing * 0.08 * length
    # tail: attached at the back of the body
    tx = bx - facing * bw * 0.9
    tl = 0.3 * length
    if tail == "fork":
        pts = [(tx, cy), (tx - facing * tl, cy - 0.5 * tl), (tx - facing * 0.55 * tl, cy),
               (tx - facing * tl, cy + 0.5 * tl)]
    elif tail == "fan":
        pts = [(tx, cy)] + [(tx - facing * tl * np.cos(a), cy + tl * np.sin(a)) for a in np.linspace(-0.6, 0.6, 9)]
    else:  # point
        pts = [(tx, cy - 0.22 * tl), (tx - facing * 1.1 * tl, cy), (tx, cy + 0.22 * tl)]
    draw.polygon(pts, fill=rgb255(tail_col))
    draw.ellipse([bx - bw, cy - bh, bx + bw, cy + bh], fill=rgb255(body_col))
    r = 0.05 * length
    for dx, dy in ((-0.45, -0.15), (-0.05, 0.35), (0.3, -0.3), (-0.15, -0.5)):
        x0, y0 = bx + facing * dx * bw, cy + dy * bh
        draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=rgb255(SPOT_COLOURS[spot]))
    hr = 0.13 * length  # head
    hx, hy = bx + facing * bw * 0.95, cy - 0.35 * bh
    draw.ellipse([hx - hr, hy - hr, hx + hr, hy + hr], fill=rgb255(body_col))
    beak = [(hx + facing * hr * 0.8, hy - 0.3 * hr), (hx + facing * hr * 1.9, hy + 0.1 * hr),
            (hx + facing * hr * 0.8, hy + 0.4 * hr)]
    draw.polygon(beak, fill=rgb255((0.2, 0.2, 0.2)))
    ex, ey = hx + facing * 0.2 * hr, hy - 0.1 * hr
    ring, er = 0.75 * hr, 0.55 * hr
    draw.ellipse([ex - ring, ey - ring, ex + ring, ey + ring], fill=(255, 255, 255))
    draw.ellipse([ex - er, ey - er, ex + er, ey + er], fill=rgb255(EYE_COLOURS[rng.integers(3)]))
    return np.asarray(bg.resize((size, size), Image.BOX))


def generate_finegrained(out: str | Path, *, num_classes: int = 6, train_per_class: int = 200,
                         val_per_class: int = 50, size: int = 32, seed: int = 0, overwrite: bool = False,
                         progress: bool = False) -> dict:
    """Write the fine-grained ImageFolder dataset; returns the parameters written to `dataset.json`."""
    check_positive(train_per_class=train_per_class, val_per_class=val_per_class, size=size)
    if size < 16:
        raise ConfigError("size", f"must be >= 16 px for the details to be drawable (got {size})")
    names = class_names(num_classes)
    out = prepare_out(out, overwrite, ("train", "val"))
    bar = progress_bar(num_classes * (train_per_class + val_per_class), "finegrained", progress, unit="img")
    for split_id, (split, n) in enumerate((("train", train_per_class), ("val", val_per_class))):
        for ci, name in enumerate(names):
            d = out / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                bar.update(1)
                img = draw_bird(size, name, rng_for(seed, split_id, ci, i))
                Image.fromarray(img).save(d / f"{i:05d}.png")
    meta = {"kind": "finegrained", "format": "imagefolder", "classes": names, "train_per_class": train_per_class,
            "val_per_class": val_per_class, "size": size, "seed": seed}
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    bar.close()
    return meta
