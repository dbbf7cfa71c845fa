"""`--tracker`: what pretrain and transfer log to TensorBoard, W&B (offline mode) and MLflow (a file store) is read
back with each tracker's own reader and equals metrics.csv: the losses at their steps, the online probe's
statistics during training, the run's config and provenance."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mimlab.cli import main
from mimlab.cli.pretrain import TRACKER_NAMES
from mimlab.engine.trackers import TRACKERS
from mimlab.errors import ConfigError

KW = "img_size=16,patch_size=4,depth=2,embed_dim=32,num_heads=2"


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


def wandb_records(out: Path) -> list[dict]:
    runs = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    done = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", str(runs[0])],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def mlflow_run(out: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    run_id = json.loads((out / "trackers.json").read_text())["mlflow"]
    return client, client.get_run(run_id)


def tb_scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tracker_names_are_one_list():
    assert TRACKER_NAMES == TRACKERS


def test_pretrain_logs_to_all_three_trackers(offline, tmp_path):
    out = tmp_path / "run"
    argv = ["pretrain", "--method", "simmim", "--model", "vit_tiny_patch16_224", "--model-kwargs", KW, "--data",
            "builtin?classes=4&per_class=8", "--out", str(out), "--steps", "6", "--batch-size", "8", "--lr", "0.05",
            "--log-every", "1", "--probe-every", "3", "--probe-images", "8", "--no-progress", "--device", "cpu",
            "--tracker", "tensorboard", "--tracker", "wandb", "--tracker", "mlflow"]
    assert main(argv) == 0
    losses = {int(r["step"]): float(r["loss"]) for r in rows(out / "metrics.csv")}
    probe_rows = rows(out / "probe.csv")
    assert len(losses) == 6 and probe_rows
    probe_key = next(k for k in probe_rows[0] if k.startswith("attention_distance"))

    # W&B: the history records at their steps, the config with the method and provenance
    recs = wandb_records(out)
    hist = [r["history"]["item"] for r in recs if r["type"] == "history"]
    got = {int(h["_step"]): h["train/loss"] for h in hist if "train/loss" in h}
    assert got.keys() == losses.keys() and all(math.isclose(got[s], losses[s], rel_tol=1e-6) for s in losses)
    layers = sorted({int(r["layer"]) for r in probe_rows})
    for layer in layers:                                     # one series per layer, at the probe's steps
        want = {int(r["step"]): float(r[probe_key]) for r in probe_rows if int(r["layer"]) == layer}
        got = {int(h["_step"]): h[f"probe/{probe_key}/layer{layer}"] for h in hist
               if f"probe/{probe_key}/layer{layer}" in h}
        assert got.keys() == want.keys() and all(math.isclose(got[s], want[s], rel_tol=1e-6) for s in want)
    config: dict = {}
    for r in recs:
        if r["type"] in ("run", "config"):
            config.update((r.get("run", {}).get("config") or r.get("config") or {}).get("update", {}))
    assert config["verb"] == "pretrain" and config["config"]["method"] == "simmim"
    assert "torch" in json.dumps(config["provenance"])

    # MLflow: the metric history and the flattened config as params
    client, run = mlflow_run(out)
    hist = client.get_metric_history(run.info.run_id, "train/loss")
    assert {m.step: m.value for m in hist} == pytest.approx(losses, rel=1e-9)
    assert len(client.get_metric_history(run.info.run_id, f"probe/{probe_key}/layer{layers[-1]}")) == \
        len({r["step"] for r in probe_rows})
    assert run.data.params["config.method"] == "simmim" and run.data.params["verb"] == "pretrain"
    assert run.info.status == "FINISHED"

    # TensorBoard, as before
    tb = tb_scalars(out)
    assert dict(tb["train/loss"]) == pytest.approx(losses, rel=1e-6)
    assert f"probe/{probe_key}/layer0" in tb


def test_transfer_logs_to_mlflow_and_csv_only(offline, tmp_path):
    from mimlab.data.downstream import generate

    data = tmp_path / "fg"
    generate("finegrained", data, num_classes=3, train_per_class=4, val_per_class=2, size=16)
    out = tmp_path / "t"
    assert main(["transfer", "--task", "classify", "--backbone", "vit_tiny_patch16_224", "--model-kwargs", KW,
                 "--data", str(data), "--out", str(out), "--steps", "4", "--batch-size", "4", "--no-progress",
                 "--device", "cpu", "--tracker", "mlflow", "--tracker", "csv"]) == 0
    assert not (out / "tensorboard").exists()
    losses = {int(r["step"]): float(r["loss"]) for r in rows(out / "metrics.csv")}
    client, run = mlflow_run(out)
    assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")} == \
        pytest.approx(losses, rel=1e-9)
    assert run.data.params["config.task"] == "classify"


def test_no_tensorboard_is_a_deprecated_alias(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--method", "simmim", "--model", "vit_tiny_patch16_224", "--model-kwargs", KW,
                 "--data", "builtin?classes=4&per_class=8", "--out", str(out), "--steps", "2", "--batch-size", "8",
                 "--no-progress", "--device", "cpu", "--no-tensorboard"]) == 0
    assert "--no-tensorboard is deprecated; use --tracker csv" in capsys.readouterr().err
    assert not (out / "tensorboard").exists() and (out / "metrics.csv").exists()


def test_a_missing_client_names_the_extra_before_any_work(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    out = tmp_path / "run"
    rc = main(["pretrain", "--method", "simmim", "--model", "vit_tiny_patch16_224", "--model-kwargs", KW,
               "--data", "builtin", "--out", str(out), "--steps", "2", "--batch-size", "8", "--tracker", "wandb"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["mimlab pretrain: error: --tracker 'wandb' needs its client: pip install "
                               "'mimlab[wandb]'"], err
    assert not out.exists()
    from mimlab.transfer.api import TransferConfig

    with pytest.raises(ConfigError, match="'neptune' is not one of tensorboard, csv, wandb, mlflow"):
        TransferConfig(task="classify", backbone="vit_tiny_patch16_224", data=".", out=".", trackers=("neptune",))


def test_a_resumed_run_continues_the_same_mlflow_run(offline, tmp_path):
    from mimlab.pretrain.api import PretrainConfig, pretrain

    out = tmp_path / "run"
    cfg = dict(method="simmim", model="vit_tiny_patch16_224", data="builtin?classes=4&per_class=8", out=out,
               model_kwargs=dict(img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2), steps=6,
               batch_size=8, lr=0.05, save_every=3, log_every=1, progress=False, device="cpu", trackers=("mlflow",))
    pretrain(PretrainConfig(**cfg, stop_after=3))                   # stops like a kill after step 3
    first = json.loads((out / "trackers.json").read_text())["mlflow"]
    pretrain(PretrainConfig(**cfg, resume=True))
    client, run = mlflow_run(out)
    assert run.info.run_id == first
    steps = sorted(m.step for m in client.get_metric_history(first, "train/loss"))
    assert steps == [1, 2, 3, 4, 5, 6]
