"""The four transfer tasks, declared once: what each reports first (the metric the study compares), its trivial
baseline, and its default optimisation. Each task module exposes `build(data, backbone, opts, mode,
eval_batch_size) -> TaskRun`; their options live in `options.py` (torch-free). To add a task: a module with
`build`, its options in `options.py`, a `TaskSpec` here (docs/architecture.md)."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from mimlab.errors import ConfigError


@dataclass(frozen=True)
class TaskSpec:
    name: str
    main_metric: str            # the metric a comparison of backbones uses (the study's C4-C6)
    higher_is_better: bool
    baseline: str               # the trivial predictor `TaskRun.baseline` evaluates
    steps: int                  # default optimisation
    batch_size: int
    lr: float


TASKS: dict[str, TaskSpec] = {
    "classify": TaskSpec("classify", "top1", True, "majority class", 800, 32, 1e-3),
    "keypoints": TaskSpec("keypoints", "ap", True, "all keypoints at the box centre", 400, 32, 1e-3),
    "depth": TaskSpec("depth", "rmse", False, "mean training depth", 400, 32, 1e-3),
    "track": TaskSpec("track", "suc", True, "stationary first-frame box", 400, 32, 5e-4),
}
TASK_NAMES = tuple(TASKS)


def task_spec(task: str, param: str = "task") -> TaskSpec:
    if task not in TASKS:
        raise ConfigError(param, f"must be one of {', '.join(TASKS)}, got '{task}'")
    return TASKS[task]


def task_builder(task: str) -> Callable:
    task_spec(task)
    return importlib.import_module(f"mimlab.transfer.tasks.{task}").build
