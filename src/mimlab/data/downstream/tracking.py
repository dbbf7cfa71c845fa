"""Sequences of a moving target among moving distractors, written in the GOT-10k layout.

Each sequence has one target: a shape (disc, square, diamond or triangle) with a two-colour pattern (stripes,
centre dot or halves), drawn identically in every frame up to a slowly varying scale. It moves with a smoothly
changing velocity and bounces off the frame borders. Two to four distractors move the same way; some share the
target's shape, some its colours, so a tracker must use the template, not a class prior. Distractors pass
*behind* the target (it is never occluded), over a static textured background.

Layout: `OUT/{train,val}/GOT-10k_{Train,Val}_NNNNNN/00000001.jpg ...` with `groundtruth.txt` (one `x,y,w,h`
line per frame, top-left corner and size in pixels) and `OUT/{train,val}/list.txt` naming the sequences.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mimlab.errors import ConfigError
from mimlab.data.downstream.common import check_positive, prepare_out, rgb255, rng_for, textured_background, \
    to_uint8, progress_bar

SHAPES = ("disc", "square", "diamond", "triangle")
PATTERNS = ("stripes", "dot", "halves")
SUPERSAMPLE = 2


def _object(rng: np.random.Generator, size: tuple[float, float], frame: int, shape: str | None = None,
            colours: np.ndarray | None = None) -> dict:
    w, h = size
    return {"shape": shape or SHAPES[rng.integers(len(SHAPES))],
            "pattern": PATTERNS[rng.integers(len(PATTERNS))],
            "colours": colours if colours is not None else rng.uniform(0.05, 0.95, (2, 3)),
            "w": w, "h": h, "pos": rng.uniform([w / 2, h / 2], [frame - w / 2, frame - h / 2]),
            "vel": rng.normal(0, 1.5, 2), "scale_phase": rng.uniform(0, 2 * np.pi)}


def _step(obj: dict, rng: np.random.Generator, frame: int, scale: float) -> None:
    obj["vel"] = 0.9 * obj["vel"] + rng.normal(0, 0.7, 2)
    speed = np.linalg.norm(obj["vel"])
    if speed > 4.0:
        obj["vel"] *= 4.0 / speed
    obj["pos"] = obj["pos"] + obj["vel"]
    half = np.array([obj["w"], obj["h"]]) * scale / 2
    for k in range(2):
        if obj["pos"][k] < half[k]:
            obj["pos"][k], obj["vel"][k] = half[k], abs(obj["vel"][k])
        elif obj["pos"][k] > frame - half[k]:
            obj["pos"][k], obj["vel"][k] = frame - half[k], -abs(obj["vel"][k])


def _draw(img: Image.Image, obj: dict, scale: float) -> tuple[float, float, float, float]:
    """Draw `obj` on the supersampled image; returns its box (x, y, w, h) in final-frame pixels."""
    s = SUPERSAMPLE
    w, h = obj["w"] * scale * s, obj["h"] * scale * s
    cx, cy = obj["pos"][0] * s, obj["pos"][1] * s
    x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    layer = Image.new("L", img.size, 0)
    dm = ImageDraw.Draw(layer)
    if obj["shape"] == "disc":
        dm.ellipse([x0, y0, x1, y1], fill=255)
    elif obj["shape"] == "square":
        dm.rectangle([x0, y0, x1, y1], fill=255)
    elif obj["shape"] == "diamond":
        dm.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=255)
    else:
        dm.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=255)
    c0, c1 = (rgb255(c) for c in obj["colours"])
    fill = Image.new("RGB", img.size, c0)
    dp = ImageDraw.Draw(fill)
    if obj["pattern"] == "stripes":
        for k in range(4):
            if k % 2:
                dp.rectangle([x0 + k * w / 4, y0, x0 + (k + 1) * w / 4, y1], fill=c1)
    elif obj["pattern"] == "dot":
        dp.ellipse([cx - w / 5, cy - h / 5, cx + w / 5, cy + h / 5], fill=c1)
    else:
        dp.rectangle([x0, cy, x1, y1], fill=c1)
    img.paste(fill, (0, 0), layer)
    return x0 / s, y0 / s, w / s, h / s


def render_sequence(frame: int, length: int, rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
    """Returns (list of uint8 frames, (length, 4) float array of target boxes x, y, w, h)."""
    s = frame * SUPERSAMPLE
    bg = Image.fromarray(to_uint8(textured_background(rng, s, s, contrast=0.45)))
    tw, th = rng.uniform(0.1, 0.2, 2) * frame
    target = _object(rng, (tw, th), frame)
    objs = []
    for k in range(int(rng.integers(2, 5))):
        dw, dh = rng.uniform(0.08, 0.2, 2) * frame
        if k == 0:
            objs.append(_object(rng, (dw, dh), frame, shape=target["shape"]))
        elif k == 1:
            objs.append(_object(rng, (dw, dh), frame, colours=target["colours"][::-1].copy()))
        else:
            objs.append(_object(rng, (dw, dh), frame))
    frames, boxes = [], []
    for t in range(length):
        img = bg.copy()
        for o in objs:
            _step(o, rng, frame, 1.0)
            _draw(img, o, 1.0)
        scale = 1.0 + 0.25 * np.sin(target["scale_phase"] + t / 15.0)
        _step(target, rng, frame, scale)
        boxes.append(_draw(img, target, scale))
        frames.append(np.asarray(img.resize((frame, frame), Image.BOX)))
    return frames, np.asarray(boxes, dtype=np.float64)


def generate_tracking(out: str | Path, *, train_sequences: int = 80, val_sequences: int = 20, length: int = 60,
                      size: int = 96, seed: int = 0, overwrite: bool = False,
                      progress: bool = False) -> dict:
    """Write the moving-target sequences in the GOT-10k layout; returns their parameters."""
    check_positive(train_sequences=train_sequences, val_sequences=val_sequences, length=length, size=size)
    if length < 2:
        raise ConfigError("length", f"must be >= 2 frames (got {length})")
    if size < 32:
        raise ConfigError("size", f"must be >= 32 px (got {size})")
    out = prepare_out(out, overwrite, ("train", "val"))
    bar = progress_bar(train_sequences + val_sequences, "tracking", progress, unit="seq")
    for split_id, (split, n) in enumerate((("train", train_sequences), ("val", val_sequences))):
        names = []
        for i in range(n):
            bar.update(1)
            name = f"GOT-10k_{split.capitalize()}_{i + 1:06d}"
            d = out / split / name
            d.mkdir(parents=True, exist_ok=True)
            frames, boxes = render_sequence(size, length, rng_for(seed, split_id, i))
            for t, fr in enumerate(frames):
                Image.fromarray(fr).save(d / f"{t + 1:08d}.jpg", quality=92)
            (d / "groundtruth.txt").write_text("".join(",".join(f"{v:.4f}" for v in b) + "\n" for b in boxes))
            names.append(name)
        (out / split / "list.txt").write_text("\n".join(names) + "\n")
    meta = {"kind": "tracking", "format": "got10k", "train_sequences": train_sequences,
            "val_sequences": val_sequences, "length": length, "size": size, "seed": seed}
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    bar.close()
    return meta
