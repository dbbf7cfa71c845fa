"""Configuration and result types of the training engine."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Everything `train` needs besides the model, the loss and the data.

    ``batch_size`` is the GLOBAL batch of one optimizer step (all processes, all accumulation micro-steps);
    ``lr`` is the absolute peak learning rate (callers apply their own scaling rule, e.g. SimMIM's
    ``base_lr * batch / 512``). Parameter groups may carry ``lr_scale`` (layer-wise decay): their lr is
    ``lr_at(step) * lr_scale``.
    """

    out_dir: str | Path
    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "cosine"            # cosine | step | constant (see engine.schedule.lr_at)
    warmup_steps: int = 0
    warmup_lr: float = 0.0
    min_lr: float = 0.0
    milestones: tuple[float, ...] = ()  # for schedule="step": fractions of the run (<1) or step numbers
    gamma: float = 0.1
    clip_grad: float | None = None      # max global grad norm; None = no clipping (the norm is still logged)
    accum_steps: int = 1
    precision: str = "fp32"             # fp32 | bf16 | fp16 (fp16 uses a GradScaler)
    compile: bool = False
    ema_decay: float | None = None      # e.g. 0.9999; None = no EMA
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"                # auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)
    num_workers: int = 0
    pin_memory: bool | None = None      # None: True on CUDA
    prefetch_factor: int = 4
    shuffle: bool = True
    save_every: int = 0                 # checkpoint every N steps (0: only at the end)
    log_every: int = 10                 # host sync / progress update / NaN check every N steps (CSV has every step)
    resume: bool = False
    overwrite: bool = False
    tensorboard: bool = True
    trackers: tuple[str, ...] | None = None  # engine.trackers.TRACKERS; None: ("tensorboard",) if tensorboard
    run_info: dict[str, Any] = field(default_factory=dict)  # the run's config and provenance, for the trackers
    progress: bool = True
    find_unused_parameters: bool = False
    fused_optimizer: bool | None = None  # None: fused AdamW when supported
    identity: dict[str, Any] = field(default_factory=dict)  # what must match to resume (method, model, data...)
    owned_outputs: tuple[str, ...] = ()  # extra files in out_dir that --overwrite may delete
    stop_after: int | None = None       # stop (like a kill: no final checkpoint) once this step is done; tests


@dataclass
class CallbackContext:
    """What a callback sees: the step just completed (1-based count), the bare model (eval mode, no grad)."""

    step: int
    model: nn.Module
    ema_model: nn.Module | None
    device: Any
    out_dir: Path
    log: Callable[[dict[str, Any]], None]  # writes a row to ``out_dir/<name>.csv`` and TensorBoard


@dataclass
class Callback:
    """Runs ``fn(ctx)`` every `every` optimizer steps (and before the first step if `at_start`).

    The global RNG states are saved and restored around it, so callbacks never change the training trajectory.
    With `main_only` it runs on rank 0 only (the others continue and wait at the next collective).
    """

    name: str
    every: int
    fn: Callable[[CallbackContext], dict[str, Any] | list[dict[str, Any]] | None]
    at_start: bool = False
    at_end: bool = True
    main_only: bool = True


@dataclass
class TrainResult:
    step: int                      # optimizer steps completed (total, including resumed ones)
    start_step: int                # where this call started (0, or the resumed checkpoint's step)
    losses: list[float]            # per-step loss of the steps run in this call (mean over ranks)
    final_loss: float | None
    img_per_s: float | None        # global images / s over this call, excluding the first logging interval
    elapsed_s: float
    checkpoint: Path | None
    stopped_early: bool = False
    skipped_samples: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    img_per_s_with_warmup: bool = False   # a run of one logging interval: its rate includes the first steps' warm-up
