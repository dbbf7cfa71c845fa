"""`mimlab probe MODEL... --data PATH --images N --batch-size B --out DIR`"""
from __future__ import annotations

import argparse

from mimlab.cli.common import add_threads_argument, threads_for
from mimlab.report.options import add_figure_arguments

from mimlab.models.checkpoints import FORMATS as CHECKPOINT_FORMATS

EPILOG = """examples:
  mimlab probe vit_small_patch16_224 --data builtin --images 64 --out runs/probe
  mimlab probe sim=beit_base_patch16_224@simmim_pretrain.pth sup=deit_base_patch16_224@deit_base.pth \\
      --model-kwargs use_abs_pos_emb=False,use_rel_pos_bias=True,init_values=0.1,use_fc_norm=False \\
      --model-kwargs "" --data /data/imagenet/val --images 1000 --batch-size 50 --device cuda --out runs/vitb
MODEL is [LABEL=]ARCH[@CHECKPOINT]: ARCH a timm model name (ViT, DeiT, BEiT, Swin, SwinV2, ...) or hf:DIR (a Hugging
Face save_pretrained directory); without a checkpoint the model is randomly initialised (flagged loudly)."""

# ProbeConfig fields whose flag is not --field-name
FLAGS = {"kernel": "--stats-kernel", "renormalize": "--no-renormalize", "js": "--no-js", "cka": "--no-cka",
         "models": "MODEL", "progress": "--quiet", "report": "--no-report"}


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        size = tuple(int(v) for v in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got '{text}'") from None
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 1:
        raise argparse.ArgumentTypeError(f"expected N or HxW with positive sizes, got '{text}'")
    return size


def _images(text: str) -> int | str:
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of images or 'all', got '{text}'") from None


def _cell(text: str) -> tuple[int, int]:
    try:
        r, c = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROW,COL, got '{text}'") from None
    return r, c


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    p.add_argument("models", nargs="+", metavar="MODEL", help="[LABEL=]ARCH[@CHECKPOINT] (timm ARCH or hf:DIR, local checkpoint)")
    p.add_argument("--data", default=None,
                   help="image folder (recursive, sorted by relative path), a .npy float32 N x 3 x H x W array "
                        "(already normalised), or builtin[:KIND] (held-out built-in images; the default, as in "
                        "pretrain)")
    p.add_argument("--images", type=_images, default=None, metavar="N|all",
                   help="use the first N images, or all (default: the first 256, or all if the data holds fewer)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size = CKA minibatch size (default 32)")
    p.add_argument("--out", default=None, help="output directory for metrics.json, tables, figures, report.html")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0, help="seed for random init and the bootstrap (default 0)")
    p.add_argument("--model-kwargs", action="append", default=[], metavar="K=V,...",
                   help="keyword arguments for timm.create_model; once for all models or once per model, in order")
    p.add_argument("--checkpoint-format", default="auto", choices=list(CHECKPOINT_FORMATS),
                   help="the checkpoint's key layout (default: detected from its key names; docs/checkpoints.md)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast for the forward")
    p.add_argument("--workers", type=int, default=2, help="data loader workers (default 2)")
    add_threads_argument(p)
    p.add_argument("--img-size", type=_size, default=None, metavar="N|HxW",
                   help="build the timm models for this input size (default: each model's own); a checkpoint's "
                        "position embedding of another grid is then resampled as timm does (recorded)")
    p.add_argument("--resize-pos-embed", action="store_true",
                   help="resample a checkpoint's position embedding of another grid to the model's (default: refuse)")
    g = p.add_argument_group("metric conventions")
    g.add_argument("--no-renormalize", action="store_true",
                   help="attention distance from raw attention to patches (not renormalised after dropping prefix)")
    g.add_argument("--kl-eps", type=float, default=1e-8, help="eps inside the log of the KL (default 1e-8)")
    g.add_argument("--nmi-norm", default="geometric", choices=["geometric", "arithmetic"])
    g.add_argument("--no-cka", action="store_true", help="skip CKA")
    g.add_argument("--cka-features", default="flatten", choices=["flatten", "mean", "cls"],
                   help="block output flattened over tokens (default), mean of patch tokens, or first prefix token")
    g.add_argument("--bootstrap", type=int, default=200, help="bootstrap replicates for CIs (0 = none)")
    g.add_argument("--stats-dtype", default="float32", choices=["float32", "float64"],
                   help="dtype of the per-chunk attention math (sums are always float64)")
    g.add_argument("--norm-outlier-k", type=float, default=3.0,
                   help="high-norm patch tokens: norm above K x the image's median patch norm (default 3)")
    g.add_argument("--no-js", action="store_true",
                   help="skip Jensen-Shannon head diversity (the costliest statistic; reported as NaN)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the torch statistics path (with --stats-kernel torch, or where no fused kernel "
                        "runs): ~20-60 s to compile")
    p.add_argument("--stats-kernel", default="auto", choices=["auto", "torch", "triton", "cpu"],
                   help="auto: the fused Triton kernel on CUDA, the fused C kernel on the CPU (compiled on first "
                        "use with the system C compiler), else the torch path")
    p.add_argument("--maps", type=int, default=0, metavar="N",
                   help="attention maps of the first N images: every head's attention of the prefix tokens and of "
                        "chosen patch queries, and attention rollout, as PNGs in OUT/maps and in report.html")
    p.add_argument("--map-query", action="append", type=_cell, default=[], metavar="ROW,COL",
                   help="a patch query of the maps (grid row and column; repeatable; default: the centre patch)")
    p.add_argument("--no-report", action="store_true", help="write metrics.json only")
    add_figure_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def config_from_args(args: argparse.Namespace):
    from mimlab.probe.api import ProbeConfig

    if args.data is None:
        import sys

        print("note: --data not given: probing the built-in images (--data builtin)", file=sys.stderr)
        args.data = "builtin"
    return ProbeConfig(models=tuple(args.models), data=args.data, images=args.images, batch_size=args.batch_size,
                       out=args.out, device=args.device, seed=args.seed, model_kwargs=tuple(args.model_kwargs),
                       checkpoint_format=args.checkpoint_format, precision=args.precision, workers=args.workers,
                       img_size=args.img_size, resize_pos_embed=args.resize_pos_embed,
                       report=not args.no_report, progress=not args.quiet, renormalize=not args.no_renormalize,
                       kl_eps=args.kl_eps, nmi_norm=args.nmi_norm, cka=not args.no_cka,
                       cka_features=args.cka_features, bootstrap=args.bootstrap, stats_dtype=args.stats_dtype,
                       js=not args.no_js, compile=args.compile, kernel=args.stats_kernel,
                       norm_outlier_k=args.norm_outlier_k, maps=args.maps, map_queries=tuple(args.map_query))


def run(args: argparse.Namespace) -> int:
    from mimlab.probe.run import run_probe, summary_lines

    from mimlab.report.options import FigureOptions

    cfg = config_from_args(args)
    figure_options = FigureOptions(args.figure_format, args.figure_dpi)   # a bad --figure-dpi fails before the work

    def report(result, paths: dict) -> None:          # rank 0, while run_probe still holds the --out lock
        if cfg.out and cfg.report:
            from mimlab.report import write_probe_report

            paths.update(write_probe_report(result.to_dict(), cfg.out, figure_options))

    with threads_for(args.threads):
        result, paths = run_probe(cfg, finish=report)
    if result.rank != 0:                      # torchrun / srun: rank 0 writes and prints
        return 0
    if not args.quiet:
        print("\n".join(summary_lines(result)))
        print(f"{result.num_images} images in {result.seconds:.1f} s ({result.images_per_second:.1f} img/s)")
    if paths:
        print(f"metrics: {paths['metrics']}")
        if "report" in paths:
            print(f"report:  {paths['report']}")
    return 0
