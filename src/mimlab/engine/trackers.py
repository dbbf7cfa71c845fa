"""Experiment trackers beside metrics.csv (which is always written and is what resuming trusts).

`--tracker` (repeatable) names them: `tensorboard` (the default; `OUT/tensorboard`), `csv` (the CSV files only),
`wandb` (`pip install 'mimlab[wandb]'`; project `$WANDB_PROJECT` or `mimlab`, run files under `OUT/wandb`; offline
with `WANDB_MODE=offline`), `mlflow` (`pip install 'mimlab[mlflow]'`; `$MLFLOW_TRACKING_URI`, else a file store at
`OUT/mlruns`; experiment `$MLFLOW_EXPERIMENT_NAME` or `mimlab`). Each receives every logged row as scalars
`STREAM/NAME` at its step (`train/loss`, `online_probe/attention_distance_norm_l3`, ...), and once the run's config
and provenance. A resumed run continues the same W&B / MLflow run (ids kept in `OUT/trackers.json`); steps past the
checkpoint that a killed run had logged are logged again (W&B drops the repeats, MLflow keeps both values).
"""
from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from mimlab.errors import ConfigError

TRACKERS = ("tensorboard", "csv", "wandb", "mlflow")
CLIENTS = {"wandb": ("wandb", "mimlab[wandb]"), "mlflow": ("mlflow", "mimlab[mlflow]")}
IDS_FILE = "trackers.json"


def check_trackers(names: Iterable[str]) -> tuple[str, ...]:
    """The tracker names, checked (known, client installed) before any work."""
    names = tuple(dict.fromkeys(names))
    for name in names:
        if name not in TRACKERS:
            raise ConfigError("trackers", f"'{name}' is not one of {', '.join(TRACKERS)}")
        if name in CLIENTS and importlib.util.find_spec(CLIENTS[name][0]) is None:
            raise ConfigError("trackers", f"'{name}' needs its client: pip install '{CLIENTS[name][1]}'")
    return names


def flat(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as `a.b` keys (MLflow params are flat)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, Mapping):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _scalars(row: Mapping[str, Any], step_key: str) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if k != step_key and isinstance(v, (int, float)) and not isinstance(v, bool)}


class _Ids:
    """Run ids of the trackers that have one, kept in OUT/trackers.json for resuming."""

    def __init__(self, out: Path, resume: bool):
        self.path = out / IDS_FILE
        self.ids: dict[str, str] = {}
        if resume and self.path.is_file():
            try:
                self.ids = json.loads(self.path.read_text())
            except ValueError:
                self.ids = {}

    def save(self, name: str, run_id: str) -> None:
        from mimlab.utils.io import atomic_write_json

        self.ids[name] = run_id
        atomic_write_json(self.path, self.ids)


class TensorBoard:
    def __init__(self, out: Path, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def config(self, info: Mapping[str, Any]) -> None:
        self.w.add_text("run", "```\n" + json.dumps(info, indent=1, default=str) + "\n```", 0)

    def log(self, stream: str, values: Mapping[str, float], step: int) -> None:
        for k, v in values.items():
            self.w.add_scalar(f"{stream}/{k}", v, step)

    def flush(self) -> None:
        self.w.flush()

    def close(self) -> None:
        self.w.close()


class WandB:
    def __init__(self, out: Path, ids: _Ids):
        import wandb

        rid = ids.ids.get("wandb")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "mimlab"), dir=str(out), name=out.name,
                              id=rid, resume="allow" if rid else None, reinit="create_new")
        ids.save("wandb", self.run.id)

    def config(self, info: Mapping[str, Any]) -> None:
        self.run.config.update(dict(info), allow_val_change=True)

    def log(self, stream: str, values: Mapping[str, float], step: int) -> None:
        self.run.log({f"{stream}/{k}": v for k, v in values.items()}, step=step)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


class MLflow:
    def __init__(self, out: Path, ids: _Ids):
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:                                       # a file store beside the run's other outputs
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (out / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        rid = ids.ids.get("mlflow")
        if rid is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "mimlab")
            exp = self.client.get_experiment_by_name(name)
            eid = exp.experiment_id if exp is not None else self.client.create_experiment(name)
            rid = self.client.create_run(eid, run_name=out.name).info.run_id
            ids.save("mlflow", rid)
        self.run_id = rid

    def config(self, info: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        params = [Param(k, str(v)[:6000]) for k, v in flat(info).items() if k not in existing]
        for i in range(0, len(params), 100):              # MLflow's batch limit
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, stream: str, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(f"{stream}/{k}", v, ts, step) for k, v in values.items()])

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def open_trackers(names: Iterable[str], out: Path, *, resume_step: int) -> list[Any]:
    """The trackers of a run (csv is the logger's own files, not a tracker object)."""
    ids = _Ids(out, resume=resume_step > 0)
    made: list[Any] = []
    for name in check_trackers(names):
        if name == "tensorboard":
            made.append(TensorBoard(out, resume_step))
        elif name == "wandb":
            made.append(WandB(out, ids))
        elif name == "mlflow":
            made.append(MLflow(out, ids))
    return made


def scalars(row: Mapping[str, Any], step_key: str = "step") -> dict[str, float]:
    return _scalars(row, step_key)
