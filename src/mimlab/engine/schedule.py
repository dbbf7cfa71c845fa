"""Learning-rate schedules as pure functions of the optimizer step."""
from __future__ import annotations

import math
from typing import Sequence

from mimlab.errors import MimlabError

SCHEDULES = ("cosine", "step", "constant")


def resolve_milestones(milestones: Sequence[float], total_steps: int) -> list[int]:
    """Milestones given as fractions of the run (0 < m < 1) or as step numbers (m >= 1) -> sorted step numbers."""
    out = []
    for m in milestones:
        if m <= 0:
            raise MimlabError(f"lr milestone {m} must be > 0 (a fraction of the run below 1, or a step number)")
        out.append(int(round(m * total_steps)) if m < 1 else int(m))
    return sorted(out)


def lr_at(step: int, *, base_lr: float, total_steps: int, warmup_steps: int = 0, warmup_lr: float = 0.0,
          min_lr: float = 0.0, schedule: str = "cosine", milestones: Sequence[float] = (),
          gamma: float = 0.1) -> float:
    """Learning rate used by optimizer update number `step` (0-based).

    Warmup (step < W): linear, ``warmup_lr + (base_lr - warmup_lr) * (step + 1) / W``, reaching base_lr at
    step W-1. After warmup, with ``t = (step - W) / (total_steps - W)`` in [0, 1):

    * cosine:   ``min_lr + (base_lr - min_lr) * (1 + cos(pi * t)) / 2``
    * step:     ``base_lr * gamma ** (number of milestones <= step)`` (SimMIM ViT-B: x0.1 at epoch 700 of 800,
      i.e. milestone 0.875); the milestones count from step 0, warmup included.
    * constant: ``base_lr``
    """
    if schedule not in SCHEDULES:
        raise MimlabError(f"unknown lr schedule '{schedule}' (choose from {', '.join(SCHEDULES)})")
    if step < warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    if schedule == "step":
        k = sum(1 for m in resolve_milestones(milestones, total_steps) if step >= m)
        return base_lr * gamma ** k
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
