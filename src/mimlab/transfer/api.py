"""Python API of `mimlab transfer`: `run_transfer(TransferConfig)` trains a head (and the backbone, unless linear) on
one task through the shared engine, evaluates it and the task's trivial baseline on the evaluation split, and writes
`OUT/metrics.json`:

    {"task", "backbone": {...}, "metrics": {...}, "baseline": {...}, "data": {...}, "train": {...},
     "config": {...}, "provenance": {...}}
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from mimlab.errors import ConfigError
from mimlab.transfer.tasks import task_builder, task_spec
from mimlab.transfer.tasks.options import TASK_OPTIONS, all_options

METRICS_FILE = "metrics.json"
MODES = ("finetune", "linear")
NORMALIZE = ("imagenet", "timm")


@dataclass(frozen=True)
class TransferConfig:
    """Everything one transfer run depends on (defaults per task: `mimlab.transfer.tasks.TASKS`)."""

    NOT_IN_KEY: ClassVar[frozenset[str]] = frozenset({"out", "resume", "overwrite", "save_every", "num_workers",
                                                      "progress", "trackers"})

    task: str
    backbone: str                          # "[LABEL=]ARCH[@CHECKPOINT]"
    data: str | Path                       # the dataset root in the task's format (docs/transfer.md)
    out: str | Path
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    steps: int | None = None               # None: the task's default
    batch_size: int | None = None
    lr: float | None = None
    seed: int = 0
    device: str = "auto"
    mode: str = "finetune"                 # finetune | linear (frozen backbone)
    layer_decay: float | None = 0.75
    weight_decay: float = 0.05
    warmup_steps: int | None = None        # None: steps / 10
    clip_grad: float | None = None
    drop_last_blocks: int = 0              # the paper's layer ablation
    reinit_last_blocks: int = 0
    resume: bool = False
    overwrite: bool = False
    save_every: int = 0
    num_workers: int = 0
    precision: str = "fp32"
    eval_batch_size: int = 64
    progress: bool = True
    normalize: str = "imagenet"            # input mean/std: imagenet, or the architecture's timm pretrained_cfg
    options: dict[str, Any] = field(default_factory=dict)   # task options (`options.py`); None values = default
    trackers: tuple[str, ...] = ("tensorboard",)   # tensorboard, csv, wandb, mlflow (`mimlab.engine.trackers`)

    def __post_init__(self) -> None:
        task_spec(self.task)
        from mimlab.engine.trackers import check_trackers

        object.__setattr__(self, "trackers", check_trackers(self.trackers))
        if self.mode not in MODES:
            raise ConfigError("mode", f"must be 'finetune' or 'linear', got '{self.mode}'")
        if self.normalize not in NORMALIZE:
            raise ConfigError("normalize", f"must be 'imagenet' or 'timm', got '{self.normalize}'")
        if self.eval_batch_size < 1:
            raise ConfigError("eval_batch_size", f"must be >= 1, got {self.eval_batch_size}")
        for name in ("drop_last_blocks", "reinit_last_blocks"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.drop_last_blocks and self.reinit_last_blocks:
            raise ConfigError("drop_last_blocks", "and reinit_last_blocks are separate ablations: use one of them")
        resolve_options(self.task, self.options)

    def resolved(self) -> dict[str, Any]:
        """steps, batch_size, lr and warmup_steps with the task's defaults filled in."""
        spec = task_spec(self.task)
        steps = int(self.steps if self.steps is not None else spec.steps)
        return {"steps": steps, "batch_size": int(self.batch_size if self.batch_size is not None else spec.batch_size),
                "lr": float(self.lr if self.lr is not None else spec.lr),
                "warmup_steps": int(self.warmup_steps if self.warmup_steps is not None else steps // 10)}


def resolve_options(task: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """The task's options with defaults filled in. Options of other tasks are refused unless None (CLI default)."""
    spec = TASK_OPTIONS[task]
    options = dict(options or {})
    known = all_options()
    unknown = sorted(k for k in options if k not in known)
    if unknown:
        raise ConfigError("options", f"names unknown transfer option(s): {', '.join(unknown)}")
    foreign = sorted(k for k, v in options.items() if k not in spec and v not in (None, ""))
    if foreign:
        raise ConfigError(foreign[0], f"is not an option of task {task} (it sets "
                                      f"{', '.join(foreign)}, which task {task} does not use)")
    out = {}
    for k, (typ, default, _) in spec.items():
        v = options.get(k)
        out[k] = default if v is None else typ(v)
    return out


def run_transfer(cfg: TransferConfig) -> dict[str, Any]:
    """Run one transfer experiment; returns the content written to `OUT/metrics.json` (rank 0; {} elsewhere).

    `out` is locked for the run's lifetime (`mimlab.utils.lock`; rank 0 holds it): a second run into the same
    directory fails at once instead of corrupting this one."""
    from mimlab.utils.lock import run_lock

    if int(os.environ.get("RANK", "0")) != 0:
        return _run_transfer(cfg)
    with run_lock(cfg.out, verb="mimlab transfer"):
        return _run_transfer(cfg)


def _run_transfer(cfg: TransferConfig) -> dict[str, Any]:
    import torch

    from mimlab.engine import TrainConfig, resolve_device, seed_everything, train
    from mimlab.transfer.backbone import build_backbone
    from mimlab.transfer.tasks.base import param_groups
    from mimlab.utils.io import atomic_write_json
    from mimlab.utils.config import key_dict
    from mimlab.utils.provenance import provenance

    opts = resolve_options(cfg.task, cfg.options)
    r = cfg.resolved()
    steps, batch_size, lr, warmup_steps = r["steps"], r["batch_size"], r["lr"], r["warmup_steps"]
    data, out = Path(cfg.data), Path(cfg.out)
    task, mode = cfg.task, cfg.mode
    finetune = mode == "finetune"

    seed_everything(cfg.seed)
    bb = build_backbone(cfg.backbone, cfg.model_kwargs, drop_last=cfg.drop_last_blocks,
                        reinit_last=cfg.reinit_last_blocks, seed=cfg.seed, normalize=cfg.normalize)
    run = task_builder(task)(str(data), bb, opts, mode, cfg.eval_batch_size)
    groups = param_groups(run.model, cfg.weight_decay, cfg.layer_decay if finetune else None)
    identity = {"kind": "transfer", "task": task, "backbone": cfg.backbone, "model_kwargs": repr(sorted(
        bb.info.model_kwargs.items())), "data": str(data.resolve()), "mode": mode, "layer_decay": cfg.layer_decay,
        "drop_last_blocks": cfg.drop_last_blocks, "reinit_last_blocks": cfg.reinit_last_blocks,
        "normalize": cfg.normalize, "options": repr(sorted(opts.items()))}
    tcfg = TrainConfig(out_dir=out, steps=steps, batch_size=batch_size, lr=lr, weight_decay=cfg.weight_decay,
                       warmup_steps=warmup_steps, clip_grad=cfg.clip_grad, precision=cfg.precision, seed=cfg.seed,
                       device=cfg.device, num_workers=cfg.num_workers, save_every=cfg.save_every, resume=cfg.resume,
                       overwrite=cfg.overwrite, identity=identity, owned_outputs=(METRICS_FILE,),
                       progress=cfg.progress, find_unused_parameters=run.find_unused_parameters,
                       trackers=cfg.trackers, run_info={"verb": "transfer", "config": key_dict(cfg),
                                                        "provenance": provenance()})
    result = train(run.model, run.loss_fn, run.train_set, tcfg, collate_fn=run.collate_fn, param_groups=groups)
    if int(os.environ.get("RANK", "0")) != 0:
        return {}
    dev = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    run.model.to(dev)
    t_eval = time.perf_counter()
    metrics = run.evaluate(run.model, dev)
    eval_s = time.perf_counter() - t_eval
    baseline = run.baseline()
    n_params = sum(p.numel() for p in run.model.parameters())
    n_train = sum(p.numel() for g in groups for p in g["params"])
    report = {
        "task": task,
        "backbone": {**bb.info.to_dict(), "spec": cfg.backbone},
        "metrics": metrics,
        "baseline": baseline,
        "baseline_kind": task_spec(task).baseline,
        "data": {"path": str(data), **run.data_info},
        "train": {"steps": result.step, "resumed_from": result.start_step, "final_loss": result.final_loss,
                  "img_per_s": result.img_per_s, "train_s": result.elapsed_s, "eval_s": eval_s,
                  "checkpoint": str(result.checkpoint) if result.checkpoint else None,
                  "params": n_params, "trainable_params": n_train},
        "config": {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": cfg.seed, "device": str(dev),
                   "mode": mode, "layer_decay": cfg.layer_decay if finetune else None,
                   "weight_decay": cfg.weight_decay, "warmup_steps": warmup_steps, "clip_grad": cfg.clip_grad,
                   "precision": cfg.precision, "normalize": cfg.normalize, "drop_last_blocks": cfg.drop_last_blocks,
                   "reinit_last_blocks": cfg.reinit_last_blocks, "options": opts},
        "provenance": provenance(),
    }
    atomic_write_json(out / METRICS_FILE, report)
    return report


def format_summary(report: dict[str, Any]) -> str:
    """A small text table: metric, model, baseline."""
    lines = [f"{report['task']} / {report['backbone']['label']}: {'metric':<16}{'model':>10}{'baseline':>10}"]
    pad = " " * (len(lines[0]) - len(f"{'metric':<16}{'model':>10}{'baseline':>10}"))
    for k, v in report["metrics"].items():
        b = report["baseline"].get(k)
        lines.append(f"{pad}{k:<16}{v:>10.4f}{b:>10.4f}" if b is not None else f"{pad}{k:<16}{v:>10.4f}")
    return "\n".join(lines)
