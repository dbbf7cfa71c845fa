"""The four transfer tasks. Each module exposes `build(data, backbone, opts, mode, eval_batch_size) -> TaskRun`;
their options live in `options.py` (torch-free)."""
from __future__ import annotations

import importlib
from typing import Callable

from mimlab.errors import MimlabError

TASKS = ("classify", "keypoints", "depth", "track")

# default optimisation settings per task: steps, batch size, peak learning rate
TASK_DEFAULTS: dict[str, dict[str, float]] = {
    "classify": {"steps": 800, "batch_size": 32, "lr": 1e-3},
    "keypoints": {"steps": 400, "batch_size": 32, "lr": 1e-3},
    "depth": {"steps": 400, "batch_size": 32, "lr": 1e-3},
    "track": {"steps": 400, "batch_size": 32, "lr": 5e-4},
}


def task_builder(task: str) -> Callable:
    if task not in TASKS:
        raise MimlabError(f"--task must be one of {', '.join(TASKS)}, got '{task}'")
    return importlib.import_module(f"mimlab.transfer.tasks.{task}").build
