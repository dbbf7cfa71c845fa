"""`mimlab data KIND ...`: write a built-in formula-driven dataset as a torchvision ImageFolder."""
from __future__ import annotations

import argparse

# Kept in sync with mimlab.data.synthetic.KINDS (a test checks); repeated here so `mimlab --help` imports no numpy.
KINDS = ("fractals", "deadleaves", "fractal-leaves")


HELP = {"fractals": "FractalDB-style categories: a random IFS per class, rendered by the chaos game",
        "deadleaves": "dead-leaves images: occluding shapes with power-law sizes, a palette per class",
        "fractal-leaves": "a fractal class over a dead-leaves background (the default pretraining data)"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    for kind in KINDS:
        p = sub.add_parser(kind, help=HELP[kind], description=HELP[kind])
        p.add_argument("--classes", type=int, required=True, help="number of classes")
        p.add_argument("--per-class", type=int, required=True, help="training images per class")
        p.add_argument("--size", type=int, required=True, help="image side in pixels (>= 8)")
        p.add_argument("--out", required=True, help="output directory (new, empty, or a matching dataset)")
        p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
        p.add_argument("--val-per-class", type=int, default=0,
                       help="held-out images per class; > 0 writes out/train and out/val (default 0: flat layout)")
        p.add_argument("--workers", type=int, default=1, help="rendering processes (default 1)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
    # the transfer tasks' datasets, written in their real on-disk formats (COCO JSON, NYUv2, GOT-10k, ImageFolder)
    from mimlab.transfer.synthetic import add_data_subcommands

    add_data_subcommands(sub)


def run(args: argparse.Namespace) -> int:
    import time

    if getattr(args, "_generate", None):
        from mimlab.transfer.synthetic import run_data_subcommand

        return run_data_subcommand(args)

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
