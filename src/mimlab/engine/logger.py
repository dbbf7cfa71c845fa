"""CSV and TensorBoard logs that survive resuming (rows past the resume step are dropped and rewritten)."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Mapping

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
    """metrics.csv (+ one CSV per named stream) and TensorBoard under ``out_dir/tensorboard``; main rank only."""

    def __init__(self, out_dir: str | Path, *, enabled: bool, tensorboard: bool, resume_step: int = 0,
                 streams: tuple[str, ...] = ("metrics",)):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.csvs: dict[str, CsvLog] = {}
        self.tb = None
        if not enabled:
            return
        for name in streams:  # rows past the checkpoint (or all rows of a run that never checkpointed) go
            truncate_csv(self.out_dir / f"{name}.csv", resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def log(self, row: Mapping[str, Any], *, stream: str = "metrics", step_key: str = "step") -> None:
        if not self.enabled:
            return
        log = self.csvs.get(stream)
        if log is None:
            log = self.csvs[stream] = CsvLog(self.out_dir / f"{stream}.csv")
        log.write(row)
        if self.tb is not None:
            step = int(row[step_key])
            prefix = "train" if stream == "metrics" else stream
            for k, v in row.items():
                if k != step_key and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
