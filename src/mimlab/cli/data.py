"""`mimlab data KIND ...`: write a built-in dataset: pretraining images as an ImageFolder, or a transfer task's
dataset in its real on-disk format."""
from __future__ import annotations

import argparse

# Kept in sync with mimlab.data.synthetic.KINDS (a test checks); repeated here so `mimlab --help` imports no numpy.
KINDS = ("fractals", "deadleaves", "fractal-leaves")


HELP = {"fractals": "FractalDB-style categories: a random IFS per class, rendered by the chaos game",
        "deadleaves": "dead-leaves images: occluding shapes with power-law sizes, a palette per class",
        "fractal-leaves": "a fractal class over a dead-leaves background (the default pretraining data)"}


EPILOG = """examples:
  mimlab data fractal-leaves --classes 100 --per-class 50 --val-per-class 10 --size 64 --out data/fl64
  mimlab data depth --out data/depth
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
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
    add_downstream_subcommands(sub)


def run(args: argparse.Namespace) -> int:
    import time

    if getattr(args, "_generate", None):
        return run_downstream_subcommand(args)

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


def add_downstream_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Add `finegrained`, `keypoints`, `depth`, `tracking` sub-commands to an argparse sub-parser group."""
    from mimlab.data.downstream import KINDS

    for kind, (_, _, help_text, options) in KINDS.items():
        p = subparsers.add_parser(kind, help=help_text, description=help_text)
        p.add_argument("--out", required=True, help="output directory (created; must be empty unless --overwrite)")
        p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
        p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        for name, (typ, default, opt_help) in options.items():
            p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=typ, default=default,
                           help=f"{opt_help} (default {default})")
        p.set_defaults(_generate=kind)


def run_downstream_subcommand(args: argparse.Namespace) -> int:
    """Run the sub-command parsed by `add_downstream_subcommands`; prints a one-line summary."""
    import time

    from mimlab.data.downstream import KINDS, generate

    kind = args._generate
    params = {name: getattr(args, name) for name in KINDS[kind][3]}
    t0 = time.perf_counter()
    meta = generate(kind, args.out, seed=args.seed, overwrite=args.overwrite, progress=not args.quiet, **params)
    print(f"wrote {kind} dataset to {args.out} in {time.perf_counter() - t0:.1f} s: "
          + ", ".join(f"{k}={v}" for k, v in meta.items() if k not in ("classes", "kind")))
    return 0
