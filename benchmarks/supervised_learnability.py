"""Does the presets' small ViT learn its labels supervised on the built-in data? Held-out top-1 per setting.

For each candidate setting this script

1. renders the built-in pretraining images (``builtin_array``, one process) and a HELD-OUT set of the same classes:
   image indices ``per_class .. per_class + eval_per_class - 1`` of every class (``offset=per_class``), disjoint
   from the training indices ``0 .. per_class - 1``;
2. trains the model supervised with mimlab's own API (`mimlab.pretrain.api.pretrain`, method ``supervised``,
   same init seed every run, ``threads=1, workers=0`` on the CPU, output under ``--out-root``) exactly as
   ``mimlab reproduce`` does (base lr per 512 images, cosine schedule with the method's warmup, AdamW,
   label smoothing), so only the listed knobs change;
3. rebuilds the classifier from ``OUT/checkpoints/last.pt`` (the training state of the whole ``Supervised``
   wrapper: keys ``encoder.*`` including ``encoder.head.*``) -- ``model.safetensors`` is the headless encoder
   export (`export_encoder_state` drops the ``head.*`` keys), so it cannot be used to classify;
4. measures top-1 of that classifier on the held-out images and on the (un-augmented) training images, with the
   eval transform of mimlab (``build_eval_transform``: the images are rendered at the model's input size, so
   resize/centre-crop are identities, then ``/255`` and the ImageNet mean/std normalisation that training applies
   to its augmented uint8 batches) -- i.e. exactly training's input pipeline minus the augmentation.

It prints, per setting: steps, batch, img/s of training (the engine's number, first logging interval excluded),
wall time, train loss first step / mean of the first 10 / mean of the last 10% of steps, held-out and train
top-1, chance level (1 / classes) and ln(classes) (the loss of a uniform guess; with label smoothing the floor is
above 0).

Crop scale: ``--crop-scales`` sets the run's RandomResizedCrop area range (``PretrainConfig.crop_scale``, the
``--crop-scale`` option of ``mimlab pretrain``; the supervised default is DeiT's (0.08, 1)); the script checks that
run.json recorded it.

Runs are sequential (never two trainings at once). Every list option takes comma-separated values and the
script runs the Cartesian product, in the order given (sizes vary slowest).

    # the baseline and the (0.67, 1) crop on 32 px, 20 classes x 100 images, 600 steps x 64:
    python benchmarks/supervised_learnability.py --sizes 32 --classes 20 --per-class 100 \\
        --crop-scales 0.08-1,0.67-1 --steps 600 --json /tmp/learn.json
    # 64 px with an 8x8 patch grid (patch_size = size // 8 unless --patch-sizes is given):
    python benchmarks/supervised_learnability.py --sizes 64 --crop-scales 0.67-1 --steps 600 \\
        --json /tmp/learn.json --append

Options worth knowing: ``--lrs`` (base lr per 512 images; the presets use 8e-3 = 1e-3 at batch 64),
``--label-smoothing``, ``--eval-per-class``, ``--kind`` (built-in kind, default fractal-leaves),
``--model``/``--depth``/``--embed-dim``/``--heads`` (default: the presets' small ViT), ``--threads``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def _scales(text: str) -> list[tuple[float, float]]:
    out = []
    for t in text.split(","):
        t = t.strip()
        if not t:
            continue
        lo, _, hi = t.partition("-")
        out.append((float(lo), float(hi or 1.0)))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", default="fractal-leaves", help="built-in data kind (mimlab.data.synthetic.KINDS)")
    p.add_argument("--sizes", type=_ints, default=[32], help="image sizes = model img_size, e.g. 32,64")
    p.add_argument("--patch-sizes", type=_ints, default=None,
                   help="patch size per entry of --sizes (default: size // 8, i.e. an 8x8 token grid)")
    p.add_argument("--classes", type=_ints, default=[20])
    p.add_argument("--per-class", type=_ints, default=[100], help="training images per class")
    p.add_argument("--crop-scales", type=_scales, default=[(0.08, 1.0)],
                   help="supervised RandomResizedCrop scales, LO-HI, comma-separated (e.g. 0.08-1,0.67-1)")
    p.add_argument("--lrs", type=_floats, default=[8e-3], help="base lr per 512 images (presets: 8e-3)")
    p.add_argument("--label-smoothing", type=_floats, default=[0.1])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--eval-per-class", type=int, default=25, help="held-out images per class")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="init + training seed (same for every run)")
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--out-root", default=None, help="run directories go here (default: a fresh dir under /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the run directories")
    p.add_argument("--json", default=None, help="write the results (list of dicts) here")
    p.add_argument("--append", action="store_true", help="append to an existing --json file instead of replacing")
    p.add_argument("--log-every", type=int, default=50)
    args = p.parse_args(argv)
    if args.patch_sizes is not None and len(args.patch_sizes) != len(args.sizes):
        p.error("--patch-sizes needs one value per --sizes entry")
    return args


def render(kind: str, *, classes: int, per_class: int, size: int, seed: int,
           offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rendered uint8 images (N, S, S, 3) + labels, in ONE process (the shared machine has 2 cores), cached."""
    from mimlab.data.builtin import builtin_array

    t = time.perf_counter()
    images, labels, cache = builtin_array(kind, classes=classes, per_class=per_class, size=size, seed=seed,
                                          offset=offset, workers=1)
    dt = time.perf_counter() - t
    if dt > 1:
        print(f"  rendered {len(images)} {size} px images (offset {offset}) in {dt:.0f} s -> {cache}", file=sys.stderr)
    return images, labels


def evaluate(model, images: np.ndarray, labels: np.ndarray, size: int, batch: int = 256) -> float:
    """Top-1 of ``model`` with mimlab's eval transform (resize + centre crop to the model size, /255, ImageNet norm)."""
    import torch

    from mimlab.data.images import build_eval_transform

    tf = build_eval_transform((size, size))
    correct = 0
    model.eval()
    with torch.inference_mode():
        for s in range(0, len(images), batch):
            x = torch.stack([tf(torch.from_numpy(im).permute(2, 0, 1)) for im in images[s:s + batch]])
            x = x.as_subclass(torch.Tensor)
            pred = model(x).argmax(-1).numpy()
            correct += int((pred == labels[s:s + batch]).sum())
    return correct / len(images)


def classifier_from_checkpoint(out: Path, arch: str, kwargs: dict[str, Any], classes: int):
    """The trained classifier (encoder + head) from the engine's last.pt (model.safetensors has no head)."""
    from mimlab.engine.state import load_checkpoint
    from mimlab.models.factory import create_model

    state = load_checkpoint(out / "checkpoints" / "last.pt")["model"]
    sd = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    if not any(k.startswith("head.") for k in sd):
        raise RuntimeError(f"{out}/checkpoints/last.pt holds no classifier head (keys: {sorted(sd)[:5]} ...)")
    model, _ = create_model(arch, kwargs, num_classes=classes)
    model.load_state_dict(sd, strict=True)
    return model


def run_one(args: argparse.Namespace, root: Path, *, size: int, patch: int, classes: int, per_class: int,
            scale: tuple[float, float], lr: float, ls: float) -> dict[str, Any]:
    import torch

    from mimlab.pretrain.api import PretrainConfig, pretrain

    name = (f"{args.kind} {size}px/p{patch} c{classes}x{per_class} crop{scale[0]:g}-{scale[1]:g} "
            f"lr{lr:g} ls{ls:g}")
    print(f"\n=== {name}: {args.steps} steps x {args.batch_size}", file=sys.stderr)
    # render first, in one process, so pretrain() finds the cache and does not fork a 2-process pool
    train_x, train_y = render(args.kind, classes=classes, per_class=per_class, size=size, seed=args.data_seed)
    held_x, held_y = render(args.kind, classes=classes, per_class=args.eval_per_class, size=size,
                            seed=args.data_seed, offset=per_class)
    kwargs = {"img_size": size, "patch_size": patch, "depth": args.depth, "embed_dim": args.embed_dim,
              "num_heads": args.heads}
    out = root / (name.replace(" ", "_").replace("/", "-"))
    data = f"builtin:{args.kind}?classes={classes}&per_class={per_class}&seed={args.data_seed}&size={size}"
    cfg = PretrainConfig(method="supervised", model=args.model, data=data, out=out, model_kwargs=kwargs,
                         steps=args.steps, batch_size=args.batch_size, lr=lr, seed=args.seed, device="cpu",
                         threads=args.threads, workers=0, label_smoothing=ls, overwrite=True,
                         tensorboard=False, progress=False, log_every=args.log_every)
    cfg.crop_scale = tuple(scale)
    t0 = time.perf_counter()
    res = pretrain(cfg)
    wall = time.perf_counter() - t0
    recorded = res.run["data"]["augmentation"]["random_resized_crop_scale"]
    assert tuple(recorded) == tuple(scale), (recorded, scale)

    torch.set_num_threads(args.threads)
    model = classifier_from_checkpoint(out, args.model, kwargs, classes)
    t1 = time.perf_counter()
    held = evaluate(model, held_x, held_y, size)
    train_acc = evaluate(model, train_x, train_y, size)
    eval_s = time.perf_counter() - t1
    losses = [float(v) for v in res.losses]
    tail = max(1, len(losses) // 10)
    row = {
        "setting": name, "kind": args.kind, "size": size, "patch_size": patch, "classes": classes,
        "per_class": per_class, "train_images": len(train_y), "eval_images": len(held_y),
        "crop_scale": list(scale), "base_lr": lr, "lr": lr * args.batch_size / 512, "label_smoothing": ls,
        "steps": res.step, "batch": args.batch_size, "epochs": round(res.step * args.batch_size / len(train_y), 1),
        "img_per_s": res.img_per_s, "train_wall_s": round(wall, 1), "eval_s": round(eval_s, 1),
        "loss_first": losses[0] if losses else None,
        "loss_first10": float(np.mean(losses[:10])) if losses else None,
        "loss_last10pct": float(np.mean(losses[-tail:])) if losses else None,
        "ln_classes": math.log(classes), "chance": 1 / classes,
        "loss_curve_50": [round(float(np.mean(losses[i:i + 50])), 4) for i in range(0, len(losses), 50)],
        "heldout_top1": held, "train_top1": train_acc, "threads": args.threads, "seed": args.seed,
        "model": args.model, "model_kwargs": kwargs,
    }
    print(f"  -> img/s {row['img_per_s']:.1f}, wall {wall:.0f} s, loss {row['loss_first10']:.3f} -> "
          f"{row['loss_last10pct']:.3f} (ln C {row['ln_classes']:.3f}), held-out top-1 {held:.3f}, "
          f"train top-1 {train_acc:.3f}, chance {row['chance']:.3f}", file=sys.stderr)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| setting | steps | batch | epochs | img/s | wall s | loss first (1st / mean 10) | loss last 10% "
            "| ln C | held-out top-1 | train top-1 | chance |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['steps']} | {r['batch']} | {r['epochs']} | {r['img_per_s']:.1f} | "
                     f"{r['train_wall_s']:.0f} | {r['loss_first']:.3f} / {r['loss_first10']:.3f} | "
                     f"{r['loss_last10pct']:.3f} | {r['ln_classes']:.3f} | {r['heldout_top1']:.3f} | "
                     f"{r['train_top1']:.3f} | {r['chance']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    root = Path(args.out_root) if args.out_root else Path(tempfile.mkdtemp(prefix="mimlab-learnability-", dir="/tmp"))
    root.mkdir(parents=True, exist_ok=True)
    patches = args.patch_sizes or [max(1, s // 8) for s in args.sizes]
    rows: list[dict[str, Any]] = []
    prior: list[dict[str, Any]] = []
    if args.json and args.append and os.path.exists(args.json):
        with open(args.json) as f:
            prior = json.load(f)
    t0 = time.perf_counter()
    for (size, patch), classes, per_class, scale, lr, ls in itertools.product(
            zip(args.sizes, patches), args.classes, args.per_class, args.crop_scales, args.lrs, args.label_smoothing):
        rows.append(run_one(args, root, size=size, patch=patch, classes=classes, per_class=per_class, scale=scale,
                            lr=lr, ls=ls))
        if args.json:  # save after every run, so an interrupted sweep keeps what it measured
            with open(args.json, "w") as f:
                json.dump(prior + rows, f, indent=1)
    print(f"\ntorch {torch.__version__}, {args.threads} thread(s), seed {args.seed}, "
          f"total {time.perf_counter() - t0:.0f} s")
    print(table(rows))
    if not args.keep and not args.out_root:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
