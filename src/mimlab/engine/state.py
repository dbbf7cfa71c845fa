"""Training state on disk: RNG states, atomic checkpoints, and the output-directory guard."""
from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from mimlab.errors import MimlabError
from mimlab.utils.io import atomic_path

STATE_FORMAT = "mimlab-train-state/1"
CHECKPOINT_NAME = "checkpoints/last.pt"


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def capture_rng() -> dict[str, Any]:
    """The global RNG states of python, numpy, torch CPU and every CUDA device."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def checkpoint_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINT_NAME


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """torch.save to a temporary file beside `path`, then rename: a crash never leaves a partial checkpoint."""
    state = {"format": STATE_FORMAT, **state}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user-facing problem
        raise MimlabError(f"cannot read checkpoint {path}: {e}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise MimlabError(f"{path} is not a mimlab training checkpoint (format {STATE_FORMAT})")
    return state


def identity_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys whose values differ between a checkpoint's run identity and the current one."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in keys
            if _norm(saved.get(k)) != _norm(current.get(k))]


def _norm(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    return v


def guard_out_dir(out_dir: str | Path, *, resume: bool, overwrite: bool, owned: Iterable[str]) -> Path | None:
    """Decide what to do with an existing output directory; returns the checkpoint to resume from, or None.

    * a checkpoint exists, neither flag: refused (another run lives there);
    * ``overwrite``: the run's own outputs (`owned`, relative names) are deleted, nothing else;
    * ``resume``: the checkpoint is returned (resume without a checkpoint starts from scratch, so the same
      command can be relaunched after preemption).
    """
    if resume and overwrite:
        raise MimlabError("--resume and --overwrite contradict each other: pick one")
    out = Path(out_dir)
    ckpt = checkpoint_path(out)
    if out.exists() and not out.is_dir():
        raise MimlabError(f"--out {out} exists and is not a directory")
    if overwrite:
        for name in owned:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        return None
    if ckpt.exists():
        if resume:
            return ckpt
        raise MimlabError(f"--out {out} already holds a run's checkpoint ({ckpt}); pass --resume to continue it "
                          "or --overwrite to replace it")
    if not resume:
        leftovers = [name for name in owned if (out / name).exists()]
        if leftovers:
            raise MimlabError(f"--out {out} already holds outputs of another run ({', '.join(leftovers)}); "
                              "pass --overwrite to replace them or choose another directory")
    return None
