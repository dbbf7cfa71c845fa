"""CSV logs that survive resuming (rows past the resume step are dropped and rewritten), and the trackers."""
from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from mimlab.errors import MimlabError
from mimlab.utils.io import atomic_write_text, disk_full_error, is_disk_full


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    return v


def truncate_csv(path: Path, keep_through_step: int) -> None:
    """Keep the header and the rows with ``step <= keep_through_step`` (atomic rewrite)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    header, body = rows[0], rows[1:]
    si = header.index("step") if "step" in header else None
    kept = [r for r in body if si is None or (r and r[si].isdigit() and int(r[si]) <= keep_through_step)]
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *kept])
    atomic_write_text(path, buf.getvalue())


@dataclass
class LossLog:
    """The step and loss columns of a run's ``metrics.csv``: its whole history, resumed attempts included; with the
    throughput of each logged interval (``img_per_s``, where the row has one)."""
    steps: list[int]
    losses: list[float]
    img_per_s: list[float] = field(default_factory=list)


def read_loss_log(path: str | os.PathLike) -> LossLog:
    """Read ``metrics.csv`` (rows without a finite loss skipped); the in-memory ``TrainResult.losses`` holds only the
    steps of the last call, so a resumed run's history comes from here."""
    p = Path(path)
    steps, losses, rates = [], [], []
    try:
        with open(p, newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"step", "loss"} <= set(reader.fieldnames):
                raise MimlabError(f"{p}: not a training log (needs the columns step and loss)")
            for row in reader:
                try:
                    step, loss = int(row["step"]), float(row["loss"])
                except (TypeError, ValueError):
                    continue
                if math.isfinite(loss):
                    steps.append(step)
                    losses.append(loss)
                try:
                    rate = float(row.get("img_per_s") or "nan")
                except ValueError:
                    rate = float("nan")
                if math.isfinite(rate) and rate > 0:
                    rates.append(rate)
    except OSError as e:
        raise MimlabError(f"{p}: cannot read the training log ({e.strerror})") from e
    return LossLog(steps, losses, rates)


class CsvLog:
    """Append rows (dicts) to a CSV; the header is the first row's keys (keys first seen later are not written)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.header: list[str] | None = None
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, newline="") as f:
                first = next(csv.reader(f), None)
            self.header = first or None

    def write(self, row: Mapping[str, Any]) -> None:
        new = self.header is None
        if new:
            self.header = list(row)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", newline="") as f:
                w = csv.writer(f)
                if new:
                    w.writerow(self.header)
                w.writerow([_fmt(row.get(k, "")) for k in self.header])
        except OSError as e:
            if is_disk_full(e):  # a torn last row is past the last checkpoint: resuming drops it
                raise disk_full_error(self.path, atomic=False) from None
            raise


class RunLogger:
    """metrics.csv (+ one CSV per named stream) and the run's trackers (`engine.trackers`: TensorBoard under
    ``out_dir/tensorboard``, W&B, MLflow); main rank only."""

    def __init__(self, out_dir: str | Path, *, enabled: bool, trackers: tuple[str, ...] = ("tensorboard",),
                 resume_step: int = 0, streams: tuple[str, ...] = ("metrics",),
                 run_info: Mapping[str, Any] | None = None):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.csvs: dict[str, CsvLog] = {}
        self.trackers: list[Any] = []
        if not enabled:
            return
        for name in streams:  # rows past the checkpoint (or all rows of a run that never checkpointed) go
            truncate_csv(self.out_dir / f"{name}.csv", resume_step)
        from mimlab.engine.trackers import open_trackers

        self.trackers = open_trackers(trackers, self.out_dir, resume_step=resume_step)
        if run_info:
            for t in self.trackers:
                t.config(run_info)

    def log(self, row: Mapping[str, Any], *, stream: str = "metrics", step_key: str = "step") -> None:
        if not self.enabled:
            return
        log = self.csvs.get(stream)
        if log is None:
            log = self.csvs[stream] = CsvLog(self.out_dir / f"{stream}.csv")
        log.write(row)
        if self.trackers:
            from mimlab.engine.trackers import scalars

            values = scalars(row, step_key)
            if "layer" in row:                  # one row per layer (the online probe): one series per layer
                values = {f"{k}/layer{int(row['layer'])}": v for k, v in values.items() if k != "layer"}
            for t in self.trackers:
                t.log("train" if stream == "metrics" else stream, values, int(row[step_key]))

    def flush(self) -> None:
        for t in self.trackers:
            t.flush()

    def close(self) -> None:
        for t in self.trackers:
            t.close()
        self.trackers = []
