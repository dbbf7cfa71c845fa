"""Pre-emption as SLURM does it: SIGUSR1 (`--signal=USR1@90`) or SIGTERM arrives mid-run; `pretrain` / `transfer`
write their checkpoint at the next step boundary and exit 75; the same command (no `--resume`) continues, and the
final weights, the logged losses and the metrics equal an uninterrupted run's bit for bit."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

KW = "img_size=16,patch_size=4,depth=2,embed_dim=32,num_heads=2"
ARCH = "vit_tiny_patch16_224"


def pretrain_argv(out: Path) -> list[str]:
    return ["pretrain", "--method", "simmim", "--model", ARCH, "--model-kwargs", KW, "--data",
            "builtin?classes=4&per_class=8", "--out", str(out), "--steps", "150", "--batch-size", "8", "--lr", "0.05",
            "--seed", "5", "--deterministic", "--drop-path", "0.1", "--save-every", "50", "--log-every", "1",
            "--no-tensorboard", "--no-progress", "--device", "cpu"]


def transfer_argv(data: Path, out: Path) -> list[str]:
    return ["transfer", "--task", "classify", "--backbone", ARCH, "--model-kwargs", KW, "--data", str(data),
            "--out", str(out), "--steps", "150", "--batch-size", "4", "--save-every", "50", "--no-progress",
            "--device", "cpu"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mimlab", *argv], env=_env(), capture_output=True, text=True,
                          timeout=600)


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_and_signal(argv: list[str], out: Path, sig: signal.Signals, after_rows: int) -> subprocess.CompletedProcess:
    """Start the run, send `sig` once metrics.csv holds `after_rows` steps, wait for it to stop."""
    p = subprocess.Popen([sys.executable, "-m", "mimlab", *argv], env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    log = out / "metrics.csv"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) > after_rows:
            break
        time.sleep(0.02)
    assert p.poll() is None, "the run ended before the signal could be sent"
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=300)
    return subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)


def state(out: Path) -> dict[str, torch.Tensor]:
    from mimlab.engine.state import load_checkpoint

    return load_checkpoint(out / "checkpoints" / "last.pt")["model"]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def losses(out: Path) -> list[str]:
    return [r["loss"] for r in rows(out / "metrics.csv")]


def check_preempted(done: subprocess.CompletedProcess, out: Path, sig: signal.Signals) -> int:
    assert done.returncode == 75, done.stderr[-2000:]
    line = done.stderr.strip().splitlines()[-1]
    assert f"stopped by {sig.name} at step" in line and "the same command resumes it (exit 75)" in line, line
    marker = json.loads((out / "checkpoints" / "preempted.json").read_text())
    assert marker["signal"] == sig.name
    from mimlab.engine.state import load_checkpoint

    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == marker["step"]
    return marker["step"]


@pytest.mark.slow
def test_pretrain_sigusr1_then_same_command_is_bit_identical(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert run(pretrain_argv(ref)).returncode == 0
    stopped = run_and_signal(pretrain_argv(out), out, signal.SIGUSR1, after_rows=20)
    step = check_preempted(stopped, out, signal.SIGUSR1)
    assert 20 <= step < 150                                                # a step boundary mid-run
    again = run(pretrain_argv(out))                                        # the same command: no --resume
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"stopped by SIGUSR1 at step {step}: resuming it" in again.stderr
    assert not (out / "checkpoints" / "preempted.json").exists()
    from safetensors.torch import load_file

    assert same(load_file(str(out / "model.safetensors")), load_file(str(ref / "model.safetensors")))
    assert same(state(out), state(ref)) and losses(out) == losses(ref)


@pytest.mark.slow
def test_transfer_sigterm_then_same_command_is_bit_identical(tmp_path):
    from mimlab.data.downstream import generate

    data = tmp_path / "fg"
    generate("finegrained", data, num_classes=3, train_per_class=4, val_per_class=2, size=16)
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert run(transfer_argv(data, ref)).returncode == 0
    stopped = run_and_signal(transfer_argv(data, out), out, signal.SIGTERM, after_rows=20)
    check_preempted(stopped, out, signal.SIGTERM)
    assert not (out / "metrics.json").exists()                             # no result from a stopped run
    again = run(transfer_argv(data, out))
    assert again.returncode == 0, again.stderr[-2000:]
    got, want = json.loads((out / "metrics.json").read_text()), json.loads((ref / "metrics.json").read_text())
    assert got["metrics"] == want["metrics"] and got["baseline"] == want["baseline"]
    assert same(state(out), state(ref)) and losses(out) == losses(ref)


@pytest.mark.slow
def test_a_finished_run_is_not_resumed_by_the_marker_logic(tmp_path):
    """Without a marker, the same command into a finished run's directory is still refused."""
    out = tmp_path / "run"
    argv = pretrain_argv(out)
    argv[argv.index("--steps") + 1] = "4"
    assert run(argv).returncode == 0
    again = run(argv)
    assert again.returncode == 2 and "already holds a run's checkpoint" in again.stderr


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_watch_turns_the_signal_into_a_request(sig):
    from mimlab.engine.preempt import PreemptionWatch

    before = signal.getsignal(getattr(signal, sig))
    with PreemptionWatch() as w:
        os.kill(os.getpid(), getattr(signal, sig))
        time.sleep(0.01)
        assert w.requested == sig
    assert signal.getsignal(getattr(signal, sig)) == before
