"""Determinism on CPU: the same seed gives bitwise-identical numbers.

Extends tests/test_probe_metrics.py::test_batch_size_does_not_change_attention_metrics_and_runs_are_bitwise_identical
(the probe API twice in one process) and tests/test_pretrain_run.py::test_kill_and_resume_reaches_the_same_parameters
(a resumed run against an uninterrupted one) to whole commands:
- `mimlab probe` run twice as separate processes (an image folder read by 0 and by 2 data-loader workers, random-init
  models built from the seed, CKA, 50 bootstrap replicates): metrics.json (every number) and replicates.npz are
  bitwise identical;
- `mimlab pretrain --deterministic` twice from scratch (tiny ViT, 6 steps, SimMIM and MAE), then `mimlab probe` on
  each exported model: identical weights, losses, metrics.json and replicates.
Numbers are compared with `==` on the parsed JSON (floats round-trip exactly through JSON) and `np.array_equal`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mimlab.cli import main

ARCH = "vit_tiny_patch16_224"
KW_TEXT = "img_size=16,patch_size=4,depth=2,embed_dim=32,num_heads=2"
VOLATILE = {"seconds", "provenance"}     # wall time, command line, host, timestamps


def numbers(metrics_json: Path) -> dict:
    """metrics.json without the fields that describe the run rather than the result (and the checkpoint's path,
    which differs between the two runs' folders; its sha256 stays)."""
    data = json.loads(metrics_json.read_text())
    for m in data["models"].values():
        m.pop("checkpoint", None)
    return {k: v for k, v in data.items() if k not in VOLATILE}


def replicates(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def assert_same_probe(a: Path, b: Path) -> None:
    na, nb = numbers(a / "metrics.json"), numbers(b / "metrics.json")
    assert na == nb
    ra, rb = replicates(a / "replicates.npz"), replicates(b / "replicates.npz")
    assert ra.keys() == rb.keys() and ra
    for k in ra:
        assert ra[k].dtype == rb[k].dtype and np.array_equal(ra[k], rb[k]), k


def probe_cmd(models: list[str], data: str, out: Path, *extra: str) -> list[str]:
    return ["probe", *models, "--model-kwargs", KW_TEXT, "--data", data, "--images", "12", "--batch-size", "6",
            "--bootstrap", "50", "--seed", "7", "--out", str(out), "--no-report", "--quiet", *extra]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("det_imgs")
    rng = np.random.default_rng(0)
    for c in ("x", "y"):
        (root / c).mkdir()
        for i in range(7):
            Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


@pytest.mark.slow
def test_probe_twice_in_separate_processes_is_bitwise_identical(folder, tmp_path):
    env = dict(os.environ)
    runs = []
    for i, workers in enumerate(("0", "2")):
        out = tmp_path / f"run{i}"
        r = subprocess.run([sys.executable, "-m", "mimlab",
                            *probe_cmd([f"a={ARCH}", "b=deit_tiny_distilled_patch16_224"], str(folder), out,
                                       "--workers", workers)],
                           capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        runs.append(out)
    assert_same_probe(*runs)
    m = numbers(runs[0] / "metrics.json")
    assert m["num_images"] == 12 and set(m["cka"]) == {"a/a", "a/b", "b/a", "b/b"}
    assert m["models"]["a"]["random_init"] and "ci" in m["models"]["a"]["layers"][0]


def test_probe_seed_changes_the_numbers(folder, tmp_path, capsys):
    """The check above is not vacuous: another seed gives another random init and other bootstrap weights."""
    assert main(probe_cmd([ARCH], str(folder), tmp_path / "s7", "--workers", "0")) == 0
    assert main(probe_cmd([ARCH], str(folder), tmp_path / "s8", "--workers", "0", "--seed", "8")) == 0
    a, b = numbers(tmp_path / "s7" / "metrics.json"), numbers(tmp_path / "s8" / "metrics.json")
    assert a["models"][ARCH]["layers"][0]["head_kl"] != b["models"][ARCH]["layers"][0]["head_kl"]


@pytest.mark.parametrize("method", ["simmim", "mae"])
def test_deterministic_pretraining_then_probe_is_bitwise_identical(method, tmp_path, monkeypatch, capsys, one_thread):
    from safetensors.torch import load_file

    monkeypatch.setenv("MIMLAB_CACHE", str(tmp_path / "cache"))
    outs = []
    for i in range(2):
        out = tmp_path / f"pre{i}"
        rc = main(["pretrain", "--method", method, "--model", ARCH, "--model-kwargs", KW_TEXT,
                   "--data", "builtin?classes=4&per_class=8", "--out", str(out), "--steps", "6", "--batch-size", "8",
                   "--lr", "0.05", "--seed", "3", "--deterministic", "--no-tensorboard", "--no-progress",
                   "--device", "cpu"])
        assert rc == 0, capsys.readouterr().err[-3000:]
        outs.append(out)
    a, b = (load_file(str(o / "model.safetensors")) for o in outs)
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and bool((a[k] == b[k]).all()) for k in a)
    la, lb = ((o / "metrics.csv").read_text().splitlines() for o in outs)
    loss = [ln.split(",") for ln in la]
    col = loss[0].index("loss")
    assert [r[col] for r in loss[1:]] == [ln.split(",")[col] for ln in lb[1:]] and len(loss) == 7
    probes = []
    for i, o in enumerate(outs):
        p = tmp_path / f"probe{i}"
        assert main(probe_cmd([f"{ARCH}@{o / 'model.safetensors'}"], "builtin", p, "--workers", "0")) == 0
        probes.append(p)
    assert_same_probe(*probes)
    m = next(iter(numbers(probes[0] / "metrics.json")["models"].values()))
    assert not m["random_init"] and len(m["checkpoint_sha256"]) == 64
    assert (outs[0] / "model.safetensors").read_bytes() == (outs[1] / "model.safetensors").read_bytes()
