"""Training state on disk: RNG states, atomic checkpoints, and the output-directory guard."""
from __future__ import annotations

import pickle
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from mimlab.errors import ConfigError, MimlabError
from mimlab.utils.io import atomic_path, remove_stale_temps

STATE_FORMAT = "mimlab-train-state/2"  # /2: plain data only (loads with torch.load(weights_only=True))
CHECKPOINT_NAME = "checkpoints/last.pt"


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def capture_rng() -> dict[str, Any]:
    """The global RNG states of python, numpy, torch CPU and every CUDA device, as plain data and tensors
    (nothing that needs a Python class to unpickle, so checkpoints load with ``weights_only=True``)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def checkpoint_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINT_NAME


def plain(obj: Any) -> Any:
    """`obj` as the plain data a ``weights_only=True`` load accepts: dicts, lists, tuples, str, numbers, None
    and tensors. numpy values become Python numbers / tensors, paths and anything else become strings."""
    if obj is None or type(obj) in (bool, int, float, str) or isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, np.generic):                 # before float: np.float64 subclasses float
        return plain(obj.item())
    for t in (bool, int, float, str):               # subclasses (IntEnum, ...) would pickle as their class
        if isinstance(obj, t):
            return t(obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, dict):
        return {(k if isinstance(k, (str, int)) else str(k)): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj) if type(obj) in (list, tuple) else [plain(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((plain(v) for v in obj), key=repr)
    return str(obj)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """torch.save to a temporary file beside `path`, then rename: a crash never leaves a partial checkpoint.

    Raises a one-line `MimlabError` naming `path` when the disk is full (the previous checkpoint stays).
    Everything besides the model/optimizer/scaler/EMA state dicts goes through `plain`.
    """
    torch_owned = ("model", "optimizer", "scaler", "ema")
    state = {"format": STATE_FORMAT, **{k: (v if k in torch_owned else plain(v)) for k, v in state.items()}}
    with atomic_path(path) as tmp:
        # through a Python file object: a full disk then raises OSError(ENOSPC) instead of torch's opaque
        # "unexpected pos" error
        with open(tmp, "wb") as f:
            torch.save(state, f)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a training checkpoint with ``torch.load(weights_only=True)``: tensors and plain data only, so a
    crafted file cannot run code; anything else is refused with a one-line error naming the file."""
    path = Path(path)
    from mimlab.utils.io import no_pickle_warning

    try:
        with no_pickle_warning():
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"Unsupported global: GLOBAL (\S+)|Unsupported operand (\S+)", str(e))
        what = (f"it needs the Python object {m.group(1)}" if m and m.group(1) else
                f"it uses pickle opcode {m.group(2)}" if m else str(e).strip().splitlines()[-1])
        legacy = ("; checkpoints written by mimlab before format 2 stored numpy objects and cannot be resumed "
                  "safely" if m and m.group(1) and m.group(1).startswith("numpy") else "")
        raise MimlabError(f"refusing to load {path}: it is not a plain-data mimlab training checkpoint ({what}; "
                          f"mimlab never runs code from a checkpoint{legacy}). Delete it or pass overwrite=True "
                          "(--overwrite) to start the run again") from None
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user-facing problem
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MimlabError(f"cannot read checkpoint {path}: {first} (truncated or corrupt? delete it or pass "
                          "overwrite=True (--overwrite))") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else None
        raise MimlabError(f"{path} is not a mimlab training checkpoint of format {STATE_FORMAT}"
                          + (f" (it says {found})" if found else ""))
    return state


def identity_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys whose values differ between a checkpoint's run identity and the current one."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in keys
            if _norm(saved.get(k)) != _norm(current.get(k))]


def _norm(v: Any) -> Any:
    v = plain(v)
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

    Temporary files that a killed run's atomic writes left in ``checkpoints/`` and beside the owned outputs
    are removed first; callers hold the directory's run lock (`mimlab.utils.lock`) where runs may overlap.
    """
    if resume and overwrite:
        raise ConfigError("resume", "and overwrite contradict each other: pick one")
    out = Path(out_dir)
    ckpt = checkpoint_path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError("out_dir", f"{out} exists and is not a directory")
    # temporary files of writes that a killed run left (the run lock says no live writer owns them)
    remove_stale_temps(ckpt.parent)
    remove_stale_temps(out, tuple(owned))
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
        from mimlab.engine.preempt import read_marker

        stopped = read_marker(ckpt)
        if stopped is not None and not overwrite:       # pre-empted: the same command continues it
            print(f"{out} holds a run stopped by {stopped.get('signal')} at step {stopped.get('step')}: resuming it",
                  file=sys.stderr)
            return ckpt
        raise ConfigError("out_dir", f"{out} already holds a run's checkpoint ({ckpt}); pass resume=True (--resume) "
                                     "to continue it or overwrite=True (--overwrite) to replace it")
    if not resume:
        leftovers = [name for name in owned if (out / name).exists()]
        if leftovers:
            raise ConfigError("out_dir", f"{out} already holds outputs of another run ({', '.join(leftovers)}); "
                                         "pass overwrite=True (--overwrite) to replace them or choose another "
                                         "directory")
    return None
