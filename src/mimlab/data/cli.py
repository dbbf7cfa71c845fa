"""`mimlab data KIND ...`: write a built-in formula-driven dataset as a torchvision ImageFolder."""
from __future__ import annotations

import argparse

# Kept in sync with mimlab.data.synthetic.KINDS (a test checks); repeated here so `mimlab --help` imports no numpy.
KINDS = ("fractals", "deadleaves", "fractal-leaves")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=KINDS, help="fractals (FractalDB-style IFS), deadleaves, or fractal-leaves "
                        "(a fractal class over a dead-leaves background; the default pretraining data)")
    parser.add_argument("--classes", type=int, required=True, help="number of classes")
    parser.add_argument("--per-class", type=int, required=True, help="training images per class")
    parser.add_argument("--size", type=int, required=True, help="image side in pixels (>= 8)")
    parser.add_argument("--out", required=True, help="output directory (new, empty, or a matching dataset)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    parser.add_argument("--val-per-class", type=int, default=0,
                        help="held-out images per class; > 0 writes out/train and out/val (default 0: flat layout)")
    parser.add_argument("--workers", type=int, default=1, help="rendering processes (default 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import time

    from mimlab.data.synthetic import write_imagefolder

    t0 = time.perf_counter()
    out = write_imagefolder(args.kind, args.out, classes=args.classes, per_class=args.per_class, size=args.size,
                            seed=args.seed, val_per_class=args.val_per_class, workers=args.workers,
                            progress=not args.quiet)
    n = args.classes * (args.per_class + args.val_per_class)
    split = f" ({args.classes * args.per_class} train + {args.classes * args.val_per_class} val)" \
        if args.val_per_class else ""
    print(f"wrote {n} {args.kind} images{split}, {args.classes} classes, {args.size}px, to {out} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0
