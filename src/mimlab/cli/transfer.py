"""`mimlab transfer`: fine-tune / linear-probe a backbone on classify, keypoints, depth or track and evaluate it.

torch and the tasks are imported inside `run`, so `mimlab --help` stays fast.
"""
from __future__ import annotations

import argparse

from mimlab.cli.common import add_threads_argument, threads_for, deprecated_alias
from mimlab.cli.pretrain import TRACKER_NAMES
from mimlab.transfer.tasks import TASK_NAMES, TASKS
from mimlab.transfer.tasks.options import all_options

EPILOG = """examples:
  mimlab data keypoints --out data/kp
  mimlab transfer --task keypoints --backbone simmim=vit_tiny_patch16_224@runs/simmim/model.safetensors \\
      --model-kwargs img_size=32,patch_size=4,depth=6,embed_dim=128,num_heads=4 --data data/kp --out runs/kp_simmim
  mimlab data finegrained --out data/fg
  mimlab transfer --task classify --backbone deit=deit_small_patch16_224@deit.pth --data data/fg \\
      --out runs/fg_deit --mode linear
"""

FLAGS = {"backbone": "--backbone", "num_workers": "--workers", "progress": "--no-progress", "out_dir": "--out"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    p.add_argument("--task", required=True, choices=TASK_NAMES, help="the downstream task")
    p.add_argument("--backbone", required=True, metavar="MODEL",
                   help="[LABEL=]ARCH[@CHECKPOINT]: a timm architecture, optionally with a local checkpoint "
                        "(e.g. a `mimlab pretrain` export); no checkpoint = random initialisation")
    p.add_argument("--model-kwargs", default="", metavar="K=V,...",
                   help="timm model arguments, e.g. img_size=32,patch_size=4,depth=6,embed_dim=128,num_heads=4; "
                        "img_size is the task's input size")
    p.add_argument("--data", required=True, help="dataset root in the task's real format (see docs/transfer.md)")
    p.add_argument("--out", required=True, help="output directory (metrics.json, metrics.csv, checkpoints/)")
    defaults = ", ".join(f"{t}: {d.steps}/{d.batch_size}/{d.lr:g}" for t, d in TASKS.items())
    g = p.add_argument_group("training", f"defaults steps/batch/lr per task: {defaults}")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps")
    g.add_argument("--batch-size", type=int, default=None, help="global batch size")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (AdamW, cosine schedule)")
    g.add_argument("--mode", choices=("finetune", "linear"), default="finetune",
                   help="finetune: train everything; linear: frozen backbone, train the head only")
    g.add_argument("--layer-decay", type=float, default=0.75,
                   help="layer-wise lr decay for fine-tuning (timm param_groups_layer_decay); 1 = off (default 0.75)")
    g.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default 0.05)")
    g.add_argument("--warmup-steps", type=int, default=None, help="linear warmup steps (default: steps / 10)")
    g.add_argument("--clip-grad", type=float, default=None, help="max gradient norm (default: none)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast precision")
    g.add_argument("--workers", dest="num_workers", type=int, default=0,
                   help="data loader worker processes (default 0)")
    deprecated_alias(g, "--num-workers", "--workers", "num_workers", type=int)
    add_threads_argument(g)
    g.add_argument("--normalize", choices=("imagenet", "timm"), default="imagenet",
                   help="input mean/std: imagenet (as mimlab pretrain, SimMIM, MAE, DeiT; default) or timm (the "
                        "architecture's pretrained_cfg)")
    g.add_argument("--eval-batch-size", type=int, default=64, help="evaluation batch size (default 64)")
    g.add_argument("--drop-last-blocks", type=int, default=0, metavar="K",
                   help="layer ablation: remove the backbone's last K blocks before transfer")
    g.add_argument("--reinit-last-blocks", type=int, default=0, metavar="K",
                   help="layer ablation: re-initialise the backbone's last K blocks before transfer")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (default: at the end)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--tracker", action="append", default=None, choices=TRACKER_NAMES, dest="trackers",
                   help="where the scalars and config go besides metrics.csv (repeatable; default tensorboard; "
                        "wandb and mlflow need mimlab[wandb] / mimlab[mlflow]); csv: the CSV only")
    t = p.add_argument_group("task options (each applies to the task named in its help)")
    for name, (typ, default, help_text) in all_options().items():
        t.add_argument(f"--{name.replace('_', '-')}", dest=name, type=typ, default=None,
                       metavar="LOW,HIGH" if name == "crop_scale" else None,
                       help=help_text if "default" in help_text else f"{help_text} (default {default!r})")


def config_from_args(args: argparse.Namespace):
    from mimlab.models.factory import parse_model_kwargs
    from mimlab.transfer.api import TransferConfig

    return TransferConfig(
        task=args.task, backbone=args.backbone, data=args.data, out=args.out,
        model_kwargs=parse_model_kwargs(args.model_kwargs), steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, device=args.device, mode=args.mode, layer_decay=args.layer_decay,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, clip_grad=args.clip_grad,
        drop_last_blocks=args.drop_last_blocks, reinit_last_blocks=args.reinit_last_blocks, resume=args.resume,
        overwrite=args.overwrite, save_every=args.save_every, num_workers=args.num_workers, precision=args.precision,
        eval_batch_size=args.eval_batch_size, progress=not args.no_progress, normalize=args.normalize,
        options={name: getattr(args, name) for name in all_options()},
        trackers=tuple(args.trackers) if args.trackers else ("tensorboard",))


def run(args: argparse.Namespace) -> int:
    import sys

    from mimlab.transfer.api import format_summary, run_transfer

    if args.crop_scale is not None and "," not in args.crop_scale:      # the one-number form before LOW,HIGH
        print(f"note: --crop-scale {args.crop_scale} (one number) is deprecated; use --crop-scale "
              f"{args.crop_scale},1 (LOW,HIGH, as in pretrain)", file=sys.stderr)
    cfg = config_from_args(args)
    with threads_for(args.threads):
        report = run_transfer(cfg)
    if report:
        print(format_summary(report))
        print(f"wrote {args.out}/metrics.json")
    return 0
