"""The training loop: `train(model, loss_fn, dataset, cfg)` (see the package docstring for the contract)."""
from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mimlab.engine.config import PRECISIONS, Callback, CallbackContext, TrainConfig, TrainResult
from mimlab.engine.dist import (DistInfo, all_gather_objects, all_reduce_mean, barrier, broadcast_object,
                                setup_distributed, teardown_distributed)
from mimlab.engine.logger import RunLogger
from mimlab.engine.optim import build_adamw, param_groups_weight_decay
from mimlab.engine.preempt import SIGNALS, PreemptionWatch, marker_path, write_marker
from mimlab.engine.sampler import SeededDataset, StepBatchSampler, mix_seed
from mimlab.engine.schedule import SCHEDULES, lr_at
from mimlab.engine.state import (capture_rng, checkpoint_path, guard_out_dir, identity_diff, load_checkpoint,
                                 restore_rng, save_checkpoint)
from mimlab.errors import ConfigError, MimlabError, Preempted, clean_worker_message

LossFn = Callable[[nn.Module, Any], Any]
SKIPPED_KEY = "_skipped"  # optional per-sample count in dict batches: unreadable inputs replaced by the dataset


class NonFiniteLossError(MimlabError):
    """The loss (or gradient norm) became NaN/inf; the run stopped before writing any checkpoint after it."""


def validate_config(cfg: TrainConfig) -> None:
    if cfg.steps < 1:
        raise ConfigError("steps", f"must be >= 1, got {cfg.steps}")
    if cfg.batch_size < 1:
        raise ConfigError("batch_size", f"must be >= 1, got {cfg.batch_size}")
    if cfg.accum_steps < 1:
        raise ConfigError("accum_steps", f"must be >= 1, got {cfg.accum_steps}")
    if cfg.precision not in PRECISIONS:
        raise ConfigError("precision", f"must be one of {', '.join(PRECISIONS)}, got '{cfg.precision}'")
    if cfg.schedule not in SCHEDULES:
        raise MimlabError(f"lr schedule must be one of {', '.join(SCHEDULES)}, got '{cfg.schedule}'")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise MimlabError(f"learning rate must be a positive number, got {cfg.lr}")
    for name, low in (("warmup_steps", 0), ("save_every", 0), ("log_every", 1)):
        if getattr(cfg, name) < low:
            raise ConfigError(name, f"must be >= {low}, got {getattr(cfg, name)}")
    if cfg.clip_grad is not None and cfg.clip_grad <= 0:
        raise ConfigError("clip_grad", f"must be > 0 (or None to disable), got {cfg.clip_grad}")
    if cfg.trackers is not None:
        from mimlab.engine.trackers import check_trackers

        check_trackers(cfg.trackers)


def to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        out = [to_device(v, device, non_blocking) for v in batch]
        return type(batch)(out) if not hasattr(batch, "_fields") else type(batch)(*out)
    return batch


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _seed_rank(seed: int, rank: int) -> None:
    s = mix_seed(seed, 0x7EA1, rank)
    random.seed(s)
    np.random.seed(s % (2 ** 32))
    torch.manual_seed(s)


@contextlib.contextmanager
def _isolated_rng() -> Any:
    py, npy = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Any:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, t in modes:
            m.train(t)


class _Pending:
    """Per-step device tensors awaiting one host sync (keeps the GPU pipeline free of per-step .item())."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.lrs: list[float] = []
        self.values: list[torch.Tensor] = []  # each: [loss, grad_norm, *log values]
        self.keys: list[str] | None = None

    def add(self, step: int, lr: float, loss: torch.Tensor, grad_norm: torch.Tensor,
            logs: dict[str, torch.Tensor]) -> None:
        if self.keys is None:
            self.keys = sorted(logs)
        vals = [loss.float().reshape(()), grad_norm.float().reshape(())]
        vals += [logs[k].float().reshape(()) if k in logs else torch.full((), float("nan"), device=loss.device)
                 for k in self.keys]
        self.steps.append(step)
        self.lrs.append(lr)
        self.values.append(torch.stack(vals))

    def __len__(self) -> int:
        return len(self.steps)

    def drain(self, info: DistInfo) -> list[dict[str, Any]]:
        if not self.steps:
            return []
        mat = all_reduce_mean(torch.stack(self.values), info).cpu().tolist()
        rows = []
        for step, lr, vals in zip(self.steps, self.lrs, mat):
            row = {"step": step, "loss": vals[0], "lr": lr, "grad_norm": vals[1]}
            row.update(zip(self.keys or [], vals[2:]))
            rows.append(row)
        self.steps, self.lrs, self.values = [], [], []
        return rows


def _logs_to_tensors(logs: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in (logs or {}).items():
        if isinstance(v, torch.Tensor):
            out[k] = v.detach().float().reshape(())
        elif isinstance(v, (int, float)):
            out[k] = torch.tensor(float(v), device=device)
    return out


def train(model: nn.Module, loss_fn: LossFn, dataset: Dataset, cfg: TrainConfig, *,
          collate_fn: Callable | None = None, param_groups: list[dict[str, Any]] | None = None,
          callbacks: Sequence[Callback] = (), extra_state: dict[str, Any] | None = None) -> TrainResult:
    """Train `model` in place for `cfg.steps` optimizer steps and return a `TrainResult` (module docstring)."""
    validate_config(cfg)
    info = setup_distributed(cfg.device)
    try:
        with numerics(cfg.deterministic, info.device), PreemptionWatch() as watch:
            return _train(model, loss_fn, dataset, cfg, info, collate_fn, param_groups, callbacks, extra_state,
                          watch)
    finally:
        teardown_distributed(info)


def _agreed_signal(watch: PreemptionWatch | None, info: DistInfo) -> str | None:
    """The pre-emption signal any rank received (all ranks stop at the same step), or None."""
    if watch is None:
        return None
    if not info.distributed:
        return watch.requested
    code = torch.tensor([SIGNALS.index(watch.requested) + 1 if watch.requested else 0], device=info.device)
    torch.distributed.all_reduce(code, op=torch.distributed.ReduceOp.MAX)
    return SIGNALS[int(code) - 1] if int(code) else None


@contextlib.contextmanager
def numerics(deterministic: bool, device: torch.device) -> Any:
    """Deterministic algorithms (and no cuDNN autotuning), or cuDNN autotuning + TF32 on CUDA; the previous
    global settings are restored afterwards."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark = saved[2]
        torch.backends.cuda.matmul.allow_tf32 = saved[3]
        torch.backends.cudnn.allow_tf32 = saved[4]


def _train(model: nn.Module, loss_fn: LossFn, dataset: Dataset, cfg: TrainConfig, info: DistInfo,
           collate_fn: Callable | None, param_groups: list[dict[str, Any]] | None,
           callbacks: Iterable[Callback], extra_state: dict[str, Any] | None,
           watch: PreemptionWatch | None = None) -> TrainResult:
    t_start = time.perf_counter()
    device = info.device
    out = Path(cfg.out_dir)
    owned = ("checkpoints", "metrics.csv", "tensorboard", *cfg.owned_outputs)
    callbacks = list(callbacks)
    owned += tuple(f"{cb.name}.csv" for cb in callbacks)

    # --- data geometry checks (identical on every rank) -------------------------------------------------------
    n = len(dataset)
    if n < cfg.batch_size:
        raise ConfigError("batch_size", f"{cfg.batch_size}: the dataset has {n} samples, fewer than one batch; "
                                        "use a smaller batch or more data")
    if cfg.batch_size % (info.world_size * cfg.accum_steps):
        raise ConfigError("batch_size", f"{cfg.batch_size} (global) must be divisible by the number of processes "
                                        f"({info.world_size}) x accum_steps ({cfg.accum_steps})")

    # --- output directory: rank 0 decides, everyone follows ----------------------------------------------------
    decision: Any = None
    if info.is_main:
        try:
            decision = guard_out_dir(out, resume=cfg.resume, overwrite=cfg.overwrite, owned=owned)
        except MimlabError as e:
            decision = e
    decision = broadcast_object(decision, info)
    if isinstance(decision, ConfigError):
        raise ConfigError(decision.param, decision.detail)
    if isinstance(decision, MimlabError):
        raise MimlabError(str(decision))
    resume_path: Path | None = decision
    barrier(info)

    # --- model, optimizer, scaler, EMA -------------------------------------------------------------------------
    model.to(device)
    model.train()
    if param_groups is None:
        groups = param_groups_weight_decay(model, cfg.weight_decay)
    else:
        groups = [dict(g) for g in param_groups]
        for g in groups:
            g.setdefault("weight_decay", cfg.weight_decay)
    optimizer = build_adamw(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=cfg.fused_optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    ema = None
    if cfg.ema_decay:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.ema_decay)

    identity = {**cfg.identity, "batch_size": cfg.batch_size, "seed": cfg.seed, "num_samples": n}
    start_step = 0
    rng_state = None
    run_notes: dict[str, Any] = {}
    resumed_loss: float | None = None          # the last step's loss before this call (a resumed run's final loss
    if resume_path is not None:                # when it resumes at its last step, killed before it could report)
        state = load_checkpoint(resume_path)
        diff = identity_diff(state.get("identity", {}), identity)
        if diff:
            raise ConfigError("resume", f"is set, but {resume_path} belongs to a different run ({'; '.join(diff)}); "
                                        "use another out_dir (--out) or overwrite=True (--overwrite)")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema"):
            ema.module.load_state_dict(state["ema"])
        start_step = int(state["step"])
        resumed_loss = state.get("last_loss")
        saved_rng = state.get("rng") or []
        if len(saved_rng) == info.world_size:
            rng_state = saved_rng[info.rank]
        else:
            run_notes["rng"] = (f"checkpoint has RNG states of {len(saved_rng)} processes, now {info.world_size}: "
                                "data order is exact, dropout/drop-path randomness is re-seeded")
        run_notes["resumed_from_step"] = start_step
        run_notes["checkpoint_extra"] = state.get("extra")
        del state  # the CPU copies of weights and optimizer state are no longer needed
        if info.is_main:
            marker_path(resume_path).unlink(missing_ok=True)      # a pre-empted run is running again
        if info.is_main:
            print(f"resuming from {resume_path} at step {start_step}/{cfg.steps}", file=sys.stderr)
    elif cfg.resume and info.is_main:
        print(f"resume=True (--resume): no checkpoint in {out}, starting from step 0", file=sys.stderr)

    ckpt_path = checkpoint_path(out)
    last_saved = start_step if resume_path is not None else None
    result = TrainResult(step=start_step, start_step=start_step, losses=[], final_loss=None, img_per_s=None,
                         elapsed_s=0.0, checkpoint=ckpt_path if last_saved is not None else None, extra=run_notes)
    if start_step >= cfg.steps:
        result.final_loss = resumed_loss
        result.elapsed_s = time.perf_counter() - t_start
        return result

    # --- wrappers: DDP, then compile ---------------------------------------------------------------------------
    net: nn.Module = model
    ddp = None
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=cfg.find_unused_parameters)
        net = ddp
    if cfg.compile:
        net = torch.compile(net)

    # --- data ---------------------------------------------------------------------------------------------------
    sampler = StepBatchSampler(n, cfg.batch_size, total_steps=cfg.steps, seed=cfg.seed, start_step=start_step,
                               rank=info.rank, world_size=info.world_size, accum_steps=cfg.accum_steps,
                               shuffle=cfg.shuffle, seeded=isinstance(dataset, SeededDataset))
    pin = (device.type == "cuda") if cfg.pin_memory is None else cfg.pin_memory
    loader_kwargs: dict[str, Any] = {}
    if cfg.num_workers > 0:
        loader_kwargs.update(prefetch_factor=cfg.prefetch_factor, persistent_workers=False)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers, collate_fn=collate_fn,
                        pin_memory=pin, generator=torch.Generator().manual_seed(cfg.seed), **loader_kwargs)
    batches = iter(loader)

    # RNG: exact continuation on resume, else a per-rank stream derived from the seed.
    if rng_state is not None:
        restore_rng(rng_state)
    else:
        _seed_rank(cfg.seed, info.rank)

    trackers = cfg.trackers if cfg.trackers is not None else (("tensorboard",) if cfg.tensorboard else ())
    logger = RunLogger(out, enabled=info.is_main, trackers=tuple(trackers), resume_step=start_step,
                       streams=("metrics", *(cb.name for cb in callbacks)), run_info=cfg.run_info)
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=start_step, disable=not (info.is_main and cfg.progress), unit="step",
               dynamic_ncols=True, desc="train", file=sys.stderr)
    pending = _Pending()
    amp = autocast_context(cfg.precision, device)
    rate_images = 0
    rate_time = 0.0
    warm_images, warm_time = 0, 0.0      # the first interval (allocator, kernels, loader start): a short run's only one
    first_interval = True
    t_mark = time.perf_counter()
    bpe = sampler.batches_per_epoch

    def save(done: int) -> None:
        nonlocal last_saved
        rngs = all_gather_objects(capture_rng(), info)
        if info.is_main:
            save_checkpoint(ckpt_path, {
                "step": done,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "ema": ema.module.state_dict() if ema is not None else None,
                "rng": rngs,
                "data": {"epoch": done // bpe, "batch_in_epoch": done % bpe, "batches_per_epoch": bpe,
                         "num_samples": n, "global_batch": cfg.batch_size, "seed": cfg.seed},
                "identity": identity,
                "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
                "extra": extra_state or {},
                "last_loss": result.losses[-1] if result.losses else resumed_loss,
            })
        barrier(info)
        last_saved = done
        result.checkpoint = ckpt_path

    def run_callbacks(done: int, final: bool = False, start: bool = False) -> None:
        for cb in callbacks:
            due = (cb.at_start if start else
                   (final and cb.at_end) or (cb.every > 0 and done % cb.every == 0))
            if not due or (cb.main_only and not info.is_main):
                continue
            with _isolated_rng(), _eval_mode(model):
                rows = cb.fn(CallbackContext(step=done, model=model, ema_model=ema.module if ema else None,
                                             device=device, out_dir=out,
                                             log=lambda row, _n=cb.name, _s=done: logger.log({"step": _s, **row},
                                                                                              stream=_n)))
            for row in ([rows] if isinstance(rows, dict) else (rows or [])):
                logger.log({"step": done, **row}, stream=cb.name)

    def flush() -> None:
        nonlocal rate_images, rate_time, warm_images, warm_time, first_interval, t_mark
        rows = pending.drain(info)
        if not rows:
            return
        now = time.perf_counter()
        dt = now - t_mark
        ips = len(rows) * cfg.batch_size / dt if dt > 0 else float("nan")
        if first_interval:
            first_interval = False
            warm_images, warm_time = len(rows) * cfg.batch_size, dt
        else:
            rate_images += len(rows) * cfg.batch_size
            rate_time += dt
        for row in rows:
            bad = not math.isfinite(row["loss"]) or (scaler is None and not math.isfinite(row["grad_norm"]))
            if bad:
                what = "loss" if not math.isfinite(row["loss"]) else "gradient norm"
                kept = (f"the last good checkpoint {ckpt_path} (step {last_saved}) is intact"
                        if last_saved is not None else "no checkpoint had been written yet")
                raise NonFiniteLossError(
                    f"{what} became {row['loss'] if what == 'loss' else row['grad_norm']} at step {row['step']}: "
                    f"training stopped; {kept}. Try a lower lr (--lr), precision='bf16' or 'fp32' (--precision) or "
                    "gradient clipping")
            row["epoch"] = round(row["step"] / bpe, 4)
            row["img_per_s"] = round(ips, 2)
            row["time_s"] = round(now - t_start, 3)
            logger.log(row)
            result.losses.append(row["loss"])
        last = rows[-1]
        bar.update(len(rows))
        bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}", img_s=f"{ips:.0f}", refresh=False)
        t_mark = time.perf_counter()

    if start_step == 0:
        run_callbacks(0, start=True)
        t_mark = time.perf_counter()

    try:
        for step in range(start_step, cfg.steps):
            lr = lr_at(step, base_lr=cfg.lr, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps,
                       warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, schedule=cfg.schedule,
                       milestones=cfg.milestones, gamma=cfg.gamma)
            for g in optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            loss_acc = torch.zeros((), device=device)
            logs_acc: dict[str, torch.Tensor] = {}
            for micro in range(cfg.accum_steps):
                try:
                    batch = next(batches)
                except MimlabError as e:
                    raise MimlabError(clean_worker_message(e)) from None
                if isinstance(batch, dict) and SKIPPED_KEY in batch:
                    result.skipped_samples += int(batch.pop(SKIPPED_KEY).sum())
                batch = to_device(batch, device, non_blocking=pin)
                sync = ddp.no_sync() if ddp is not None and micro < cfg.accum_steps - 1 else contextlib.nullcontext()
                with sync:
                    with amp:
                        res = loss_fn(net, batch)
                    loss, logs = res if isinstance(res, tuple) else (res, {})
                    scaled = loss.float() / cfg.accum_steps
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                loss_acc += loss.detach().float() / cfg.accum_steps
                for k, v in _logs_to_tensors(logs, device).items():
                    logs_acc[k] = logs_acc.get(k, 0) + v / cfg.accum_steps
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad or float("inf"))
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model, step=step + 1)
            done = step + 1
            pending.add(done, lr, loss_acc, grad_norm, logs_acc)
            save_due = (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps
            cb_due = any(cb.every > 0 and done % cb.every == 0 for cb in callbacks)
            stop = cfg.stop_after is not None and done >= cfg.stop_after
            if len(pending) >= cfg.log_every or save_due or cb_due or stop or done == cfg.steps:
                flush()
            if save_due:
                save(done)
                t_mark = time.perf_counter()
            result.step = done
            if cb_due or done == cfg.steps:
                run_callbacks(done, final=done == cfg.steps)
            if cb_due or done == cfg.steps:
                t_mark = time.perf_counter()
            signal_name = _agreed_signal(watch, info)
            if signal_name is not None and done < cfg.steps:
                flush()
                if not save_due:
                    save(done)
                if info.is_main:
                    write_marker(ckpt_path, done, signal_name)
                barrier(info)
                raise Preempted(f"stopped by {signal_name} at step {done}/{cfg.steps}: checkpoint {ckpt_path}; "
                                f"the same command resumes it (exit {Preempted.EXIT_CODE})")
            if stop and done < cfg.steps:
                result.stopped_early = True
                break
    finally:
        bar.close()
        logger.close()
        # stop the loader's worker processes now (on an error too): left to the garbage collector, their shutdown
        # stalls ~5 s
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        del batches

    result.skipped_samples = sum(all_gather_objects(result.skipped_samples, info))
    result.final_loss = result.losses[-1] if result.losses else resumed_loss
    result.img_per_s = rate_images / rate_time if rate_time > 0 else None
    if result.img_per_s is None and warm_time > 0:
        result.img_per_s, result.img_per_s_with_warmup = warm_images / warm_time, True
    result.elapsed_s = time.perf_counter() - t_start
    return result
