"""Python API of `mimlab transfer`: `run_transfer(...)` trains a head (and the backbone, unless linear) on one
task through the shared engine, evaluates it and the trivial baseline on the evaluation split, and writes
`OUT/metrics.json`:

    {"task", "backbone": {...}, "metrics": {...}, "baseline": {...}, "data": {...}, "train": {...},
     "config": {...}, "provenance": {...}}
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from mimlab.errors import MimlabError
from mimlab.transfer.tasks import TASK_DEFAULTS, TASKS, task_builder
from mimlab.transfer.tasks.options import TASK_OPTIONS, all_options

METRICS_FILE = "metrics.json"


def resolve_options(task: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """The task's options with defaults filled in. Options of other tasks are refused unless None (CLI default)."""
    spec = TASK_OPTIONS[task]
    options = dict(options or {})
    known = all_options()
    unknown = sorted(k for k in options if k not in known)
    if unknown:
        raise MimlabError(f"unknown transfer option(s): {', '.join(unknown)}")
    foreign = sorted(k for k, v in options.items() if k not in spec and v not in (None, ""))
    if foreign:
        raise MimlabError(f"--task {task} does not use option(s) " + ", ".join(f"--{k.replace('_', '-')}"
                                                                                for k in foreign))
    out = {}
    for k, (typ, default, _) in spec.items():
        v = options.get(k)
        out[k] = default if v is None else typ(v)
    return out


def run_transfer(task: str, backbone: str, data: str | Path, out: str | Path, *,
                 model_kwargs: dict[str, Any] | None = None, steps: int | None = None,
                 batch_size: int | None = None, lr: float | None = None, seed: int = 0, device: str = "auto",
                 mode: str = "finetune", layer_decay: float | None = 0.75, weight_decay: float = 0.05,
                 warmup_steps: int | None = None, clip_grad: float | None = None, drop_last_blocks: int = 0,
                 reinit_last_blocks: int = 0, resume: bool = False, overwrite: bool = False, save_every: int = 0,
                 num_workers: int = 0, precision: str = "fp32", eval_batch_size: int = 64, progress: bool = True,
                 normalize: str = "imagenet", options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one transfer experiment; returns the content written to `OUT/metrics.json` (rank 0; {} elsewhere).

    `out` is locked for the run's lifetime (`mimlab.utils.lock`; rank 0 holds it): a second run into the same
    directory fails at once instead of corrupting this one."""
    from mimlab.utils.lock import run_lock

    kwargs = dict(model_kwargs=model_kwargs, steps=steps, batch_size=batch_size, lr=lr, seed=seed, device=device,
                  mode=mode, layer_decay=layer_decay, weight_decay=weight_decay, warmup_steps=warmup_steps,
                  clip_grad=clip_grad, drop_last_blocks=drop_last_blocks, reinit_last_blocks=reinit_last_blocks,
                  resume=resume, overwrite=overwrite, save_every=save_every, num_workers=num_workers,
                  precision=precision, eval_batch_size=eval_batch_size, progress=progress, normalize=normalize,
                  options=options)
    if int(os.environ.get("RANK", "0")) != 0:
        return _run_transfer(task, backbone, data, out, **kwargs)
    with run_lock(out, verb="mimlab transfer"):
        return _run_transfer(task, backbone, data, out, **kwargs)


def _run_transfer(task: str, backbone: str, data: str | Path, out: str | Path, *,
                  model_kwargs: dict[str, Any] | None, steps: int | None, batch_size: int | None, lr: float | None,
                  seed: int, device: str, mode: str, layer_decay: float | None, weight_decay: float,
                  warmup_steps: int | None, clip_grad: float | None, drop_last_blocks: int, reinit_last_blocks: int,
                  resume: bool, overwrite: bool, save_every: int, num_workers: int, precision: str,
                  eval_batch_size: int, progress: bool, normalize: str,
                  options: dict[str, Any] | None) -> dict[str, Any]:
    import torch

    from mimlab.engine import TrainConfig, resolve_device, seed_everything, train
    from mimlab.transfer.backbone import build_backbone
    from mimlab.transfer.tasks.base import param_groups
    from mimlab.utils.io import atomic_write_json
    from mimlab.utils.provenance import provenance

    if task not in TASKS:
        raise MimlabError(f"--task must be one of {', '.join(TASKS)}, got '{task}'")
    if mode not in ("finetune", "linear"):
        raise MimlabError(f"--mode must be 'finetune' or 'linear', got '{mode}'")
    if eval_batch_size < 1:
        raise MimlabError("--eval-batch-size must be >= 1")
    opts = resolve_options(task, options)
    d = TASK_DEFAULTS[task]
    steps = int(steps if steps is not None else d["steps"])
    batch_size = int(batch_size if batch_size is not None else d["batch_size"])
    lr = float(lr if lr is not None else d["lr"])
    warmup_steps = int(warmup_steps if warmup_steps is not None else steps // 10)
    data, out = Path(data), Path(out)

    seed_everything(seed)
    bb = build_backbone(backbone, model_kwargs, drop_last=drop_last_blocks, reinit_last=reinit_last_blocks,
                        seed=seed, normalize=normalize)
    run = task_builder(task)(str(data), bb, opts, mode, eval_batch_size)
    groups = param_groups(run.model, weight_decay, layer_decay if mode == "finetune" else None)
    identity = {"kind": "transfer", "task": task, "backbone": backbone, "model_kwargs": repr(sorted(
        bb.info.model_kwargs.items())), "data": str(data.resolve()), "mode": mode, "layer_decay": layer_decay,
        "drop_last_blocks": drop_last_blocks, "reinit_last_blocks": reinit_last_blocks, "normalize": normalize,
        "options": repr(sorted(
            opts.items()))}
    cfg = TrainConfig(out_dir=out, steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                      warmup_steps=warmup_steps, clip_grad=clip_grad, precision=precision, seed=seed, device=device,
                      num_workers=num_workers, save_every=save_every, resume=resume, overwrite=overwrite,
                      identity=identity, owned_outputs=(METRICS_FILE,), progress=progress,
                      find_unused_parameters=run.find_unused_parameters)
    result = train(run.model, run.loss_fn, run.train_set, cfg, collate_fn=run.collate_fn, param_groups=groups)
    if int(os.environ.get("RANK", "0")) != 0:
        return {}
    dev = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    run.model.to(dev)
    t_eval = time.perf_counter()
    metrics = run.evaluate(run.model, dev)
    eval_s = time.perf_counter() - t_eval
    baseline = run.baseline()
    n_params = sum(p.numel() for p in run.model.parameters())
    n_train = sum(p.numel() for g in groups for p in g["params"])
    report = {
        "task": task,
        "backbone": {**bb.info.to_dict(), "spec": backbone},
        "metrics": metrics,
        "baseline": baseline,
        "baseline_kind": {"classify": "majority class", "keypoints": "all keypoints at the box centre",
                          "depth": "mean training depth", "track": "stationary first-frame box"}[task],
        "data": {"path": str(data), **run.data_info},
        "train": {"steps": result.step, "resumed_from": result.start_step, "final_loss": result.final_loss,
                  "img_per_s": result.img_per_s, "train_s": result.elapsed_s, "eval_s": eval_s,
                  "checkpoint": str(result.checkpoint) if result.checkpoint else None,
                  "params": n_params, "trainable_params": n_train},
        "config": {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "device": str(dev),
                   "mode": mode, "layer_decay": layer_decay if mode == "finetune" else None,
                   "weight_decay": weight_decay, "warmup_steps": warmup_steps, "clip_grad": clip_grad,
                   "precision": precision, "normalize": normalize, "drop_last_blocks": drop_last_blocks,
                   "reinit_last_blocks": reinit_last_blocks, "options": opts},
        "provenance": provenance(torch_threads=torch.get_num_threads()),
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

