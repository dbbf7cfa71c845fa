"""Pre-emption: SIGTERM or SIGUSR1 (SLURM's warning, `sbatch --signal=USR1@90`) during training asks for a stop.

The training loop checks `PreemptionWatch.requested` at every step boundary (all ranks agree through one all_reduce),
writes its checkpoint and a marker `checkpoints/preempted.json`, and raises `mimlab.errors.Preempted` (exit 75). The
same command then resumes from that checkpoint without `--resume` (the marker says the run was stopped, not
finished), so `sbatch --requeue` or a plain rerun continues it exactly.
"""
from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

SIGNALS = ("SIGTERM", "SIGUSR1")
MARKER = "preempted.json"


class PreemptionWatch:
    """Within the block, SIGTERM and SIGUSR1 set `requested` (the signal's name) instead of ending the process.
    Outside the main thread (where handlers cannot be installed) it watches nothing."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._saved: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> "PreemptionWatch":
        if threading.current_thread() is threading.main_thread():
            for name in SIGNALS:
                sig = getattr(signal, name)
                self._saved[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._saved.items():
            signal.signal(sig, old)
        self._saved.clear()


def marker_path(checkpoint: Path) -> Path:
    return Path(checkpoint).parent / MARKER


def write_marker(checkpoint: Path, step: int, signal_name: str) -> None:
    from mimlab.utils.io import atomic_write_json

    atomic_write_json(marker_path(checkpoint), {"step": step, "signal": signal_name,
                                                "time": time.strftime("%Y-%m-%d %H:%M:%S")})


def read_marker(checkpoint: Path) -> dict[str, Any] | None:
    p = marker_path(checkpoint)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {"step": "?", "signal": "?"}
