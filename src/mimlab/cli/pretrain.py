"""`mimlab pretrain`: SimMIM, MAE or supervised pretraining (one process, or many under torchrun)."""
from __future__ import annotations

import argparse

from mimlab.report.options import add_figure_arguments

EPILOG = """examples:
  mimlab pretrain --method simmim --model vit_tiny_patch16_224 \\
      --model-kwargs img_size=32,patch_size=4,depth=6,embed_dim=128,num_heads=4 \\
      --data builtin --out runs/simmim --steps 600 --batch-size 128 --lr 2e-3
  torchrun --nproc_per_node 8 -m mimlab pretrain --method simmim --model vit_base_patch16_224 \\
      --data /data/imagenet/train --out runs/simmim-b --steps 100000 --batch-size 2048 --precision bf16 --compile

--data: 'builtin' or 'builtin:KIND?classes=100&per_class=32&seed=0' (formula-driven images rendered at the model's
input size, cached under $MIMLAB_CACHE), or a directory (ROOT/CLASS/*.jpg, or a flat folder for MIM).
--batch-size is the global batch (all processes, all accumulation steps); --lr is the BASE lr per 512 images
(lr = base * batch / 512, SimMIM's rule).
"""


def _float_or_none(text: str) -> float | None:
    return None if text.lower() in ("none", "off", "0") else float(text)


def _crop_scale(text: str) -> tuple[float, float]:
    parts = text.split(",")
    try:
        lo, hi = (float(v) for v in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH (e.g. 0.67,1), got '{text}'") from None
    return lo, hi


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    p.add_argument("--method", required=True, choices=("simmim", "mae", "supervised"))
    p.add_argument("--model", required=True, help="timm architecture name, e.g. vit_base_patch16_224")
    p.add_argument("--model-kwargs", default="", help="k=v,... passed to timm.create_model")
    add_figure_arguments(p)
    p.add_argument("--data", default="builtin", help="'builtin[:KIND?classes=..&per_class=..]' or an image folder")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--batch-size", type=int, required=True, help="global batch per optimizer step")
    p.add_argument("--lr", type=float, default=None,
                   help="base lr per 512 images (default: simmim 1e-4, mae 3e-4, supervised 5e-4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (always at the end)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.add_argument("--probe-every", type=int, default=0,
                   help="every N steps, log per-layer attention distance / head diversity on held-out images")
    p.add_argument("--probe-images", type=int, default=32, help="held-out images for --probe-every")
    p.add_argument("--deterministic", action="store_true", help="deterministic algorithms (bitwise resume)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    t = p.add_argument_group("optimisation")
    t.add_argument("--accum-steps", type=int, default=1, help="gradient accumulation micro-steps")
    t.add_argument("--warmup-steps", type=int, default=None, help="default: the method's warmup fraction")
    t.add_argument("--schedule", choices=("cosine", "step", "constant"), default=None,
                   help="default: simmim step (x0.1 at 7/8), others cosine")
    t.add_argument("--milestones", type=float, nargs="+", default=None,
                   help="step schedule: fractions (<1) or step numbers")
    t.add_argument("--weight-decay", type=float, default=None)
    t.add_argument("--clip-grad", type=_float_or_none, default=-1.0, help="max grad norm (simmim default 5; 'none')")
    t.add_argument("--ema", type=float, default=None, metavar="DECAY", help="keep an EMA of the weights")
    t.add_argument("--drop-path", type=float, default=None, help="encoder drop_path_rate")
    t.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: auto)")
    t.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 is often fastest on a busy machine)")
    m = p.add_argument_group("method")
    m.add_argument("--mask-ratio", type=float, default=None, help="simmim 0.6, mae 0.75")
    m.add_argument("--mask-patch-size", type=int, default=None,
                   help="simmim mask cell in px (default 32, scaled down for small inputs)")
    m.add_argument("--decoder-dim", type=int, default=None, help="mae decoder width")
    m.add_argument("--decoder-depth", type=int, default=None, help="mae decoder blocks")
    m.add_argument("--decoder-heads", type=int, default=None, help="mae decoder heads")
    m.add_argument("--no-norm-pix-loss", action="store_true", help="mae: raw-pixel targets")
    m.add_argument("--label-smoothing", type=float, default=0.1)
    m.add_argument("--crop-scale", type=_crop_scale, default=None, metavar="LOW,HIGH",
                   help="RandomResizedCrop area range (default: simmim 0.67,1; mae 0.2,1; supervised 0.08,1)")
    m.add_argument("--mixup", type=float, default=0.0, help="supervised: mixup alpha")
    m.add_argument("--cutmix", type=float, default=0.0, help="supervised: cutmix alpha")
    o = p.add_argument_group("input/output")
    o.add_argument("--bad-images", choices=("fail", "skip"), default="fail",
                   help="unreadable image files: stop naming the file, or skip them (counted)")
    o.add_argument("--log-every", type=int, default=10, help="host sync/progress interval (the CSV has every step)")
    o.add_argument("--tracker", action="append", default=None, choices=TRACKER_NAMES, dest="trackers",
                   help="where the scalars, config and online-probe statistics go besides metrics.csv (repeatable; "
                        "default tensorboard; wandb and mlflow need mimlab[wandb] / mimlab[mlflow]); csv: the CSV only")
    o.add_argument("--no-tensorboard", action="store_true", help="deprecated: --tracker csv")
    o.add_argument("--no-progress", action="store_true")


TRACKER_NAMES = ("tensorboard", "csv", "wandb", "mlflow")     # mimlab.engine.trackers.TRACKERS (not imported here)

FLAGS = {"ema_decay": "--ema", "trackers": "--tracker", "norm_pix_loss": "--no-norm-pix-loss", "tensorboard": "--no-tensorboard",
         "progress": "--no-progress", "out_dir": "--out"}


def config_from_args(args: argparse.Namespace):
    from mimlab.models.factory import parse_model_kwargs
    from mimlab.pretrain.api import PretrainConfig

    return PretrainConfig(
        method=args.method, model=args.model, data=args.data, out=args.out,
        model_kwargs=parse_model_kwargs(args.model_kwargs), steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, seed=args.seed, save_every=args.save_every, resume=args.resume, overwrite=args.overwrite,
        deterministic=args.deterministic,
        device=args.device, compile=args.compile, precision=args.precision, accum_steps=args.accum_steps,
        workers=args.workers, threads=args.threads, warmup_steps=args.warmup_steps, schedule=args.schedule,
        milestones=tuple(args.milestones) if args.milestones else None, weight_decay=args.weight_decay,
        clip_grad=args.clip_grad, ema_decay=args.ema, drop_path=args.drop_path, mask_ratio=args.mask_ratio,
        mask_patch_size=args.mask_patch_size, decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth,
        decoder_heads=args.decoder_heads, norm_pix_loss=not args.no_norm_pix_loss,
        label_smoothing=args.label_smoothing, mixup=args.mixup, cutmix=args.cutmix, crop_scale=args.crop_scale,
        bad_images=args.bad_images,
        log_every=args.log_every, tensorboard=not args.no_tensorboard, progress=not args.no_progress,
        trackers=trackers_from_args(args))


def trackers_from_args(args: argparse.Namespace) -> tuple[str, ...] | None:
    """--tracker values; --no-tensorboard (deprecated, noted by `run` once the config is valid) is --tracker csv."""
    if getattr(args, "no_tensorboard", False):
        return tuple(t for t in (args.trackers or ["csv"]) if t != "tensorboard")
    return tuple(args.trackers) if args.trackers else None


def run(args: argparse.Namespace) -> int:
    from mimlab.pretrain.api import check_config, pretrain

    from mimlab.report.options import FigureOptions

    cfg = config_from_args(args)
    check_config(cfg)
    figure_options = FigureOptions(args.figure_format, args.figure_dpi)   # loss.png's
    callbacks = []
    if args.probe_every < 0:
        from mimlab.errors import ConfigError

        raise ConfigError("probe_every", f"must be >= 0, got {args.probe_every}")
    if args.no_tensorboard:                       # after the checks: an error is the only line of a refused run
        import sys

        print("note: --no-tensorboard is deprecated; use --tracker csv", file=sys.stderr)
    if args.probe_every:
        from mimlab.probe.online import online_probe

        callbacks.append(online_probe(args.probe_every, args.probe_images, cfg.data, cfg.seed))
    res = pretrain(cfg, callbacks)
    if res.model_path is not None:             # rank 0 of a finished run: the loss curve beside metrics.csv
        from mimlab.report.figures import write_loss_figure

        write_loss_figure(res.out / "metrics.csv", res.out, f"{args.method} {cfg.model}", figure_options)
        if res.img_per_s is None:            # nothing ran in this call (a finished run resumed)
            done = "no steps run in this call"
        else:
            warm = " (one logging interval: warm-up included)" if res.train.img_per_s_with_warmup else ""
            done = f"final loss {res.final_loss:.4f}, {res.img_per_s:.0f} img/s{warm}"
        print(f"pretrain: {args.method} step {res.step}, {done}; wrote {res.model_path}")
    return 0
