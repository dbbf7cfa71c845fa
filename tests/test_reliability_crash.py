"""Crash safety: `mimlab pretrain`, `transfer` and `reproduce` are SIGKILLed at seeded random points and rerun.

Every kill is a real ``kill -9`` of a separate process running ``mimlab.cli.main(argv)`` (what the `mimlab`
command runs). To keep ~35 processes affordable on a 2-core machine they are forked from a "zygote" process
that imported torch/timm/mimlab once (single-threaded, before any torch computation, so forking is safe);
`tests/test_pretrain_run.py::test_sigkill_then_resume_from_the_command_line` covers a fresh `python -m mimlab`.

Kill points (chosen by a seeded `random.Random`, printed with ``-s``):
* ``delay``: a random delay after the process starts (anywhere: setup, training, export, report);
* ``step``: as soon as ``metrics.csv`` shows a random step (``--log-every 1``);
* ``write``: during the k-th atomic write of a named file (``checkpoints/last.pt``, ``model.safetensors``,
  ``metrics.json``, ``stage.json``, ``summary.json``): the test-only hook ``MIMLAB_TEST_STALL_WRITE`` in
  `mimlab.utils.io.atomic_path` pauses the writer after the temporary file is complete, before the rename.

After each kill: the run lock is free again, any ``last.pt`` loads (``weights_only=True``) and holds a
checkpoint step; after the rerun: the run reached its final step, its results equal an uninterrupted run's
bitwise and no temporary file is left.
"""
from __future__ import annotations

import csv
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from mimlab.engine.state import load_checkpoint
from mimlab.utils.io import STALL_ENV
from mimlab.utils.lock import run_lock
from conftest import MINI_STUDY

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")]

SEED = 20240607
KW_TEXT = "img_size=16,patch_size=4,depth=2,embed_dim=32,num_heads=2"
ARCH = "vit_tiny_patch16_224"

ZYGOTE = r"""
import json, os, sys, traceback
import torch
torch.set_num_threads(1)
import importlib
for m in ("timm", "safetensors.torch", "tqdm.auto", "mimlab.cli", "mimlab.engine", "mimlab.models.factory",
          "mimlab.models.checkpoints", "mimlab.pretrain.api", "mimlab.pretrain.data", "mimlab.data.images",
          "mimlab.pretrain.simmim",
          "mimlab.pretrain.mae", "mimlab.pretrain.supervised", "mimlab.pretrain.masking", "mimlab.transfer.api",
          "mimlab.transfer.backbone", "mimlab.transfer.tasks.classify", "mimlab.transfer.tasks.keypoints",
          "mimlab.transfer.tasks.depth", "mimlab.transfer.tasks.track", "mimlab.data.downstream",
          "mimlab.probe.api", "mimlab.probe.run", "mimlab.reproduce.pipeline", "mimlab.reproduce.summary", "mimlab.report.study",
          "mimlab.report.figures", "mimlab.report.html", "matplotlib.pyplot", "pycocotools.cocoeval"):
    try:
        importlib.import_module(m)
    except ImportError:
        pass
from mimlab.cli import main
print(json.dumps({"ready": os.getpid()}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "run":
        pid = os.fork()
        if pid == 0:
            rc = 1
            try:
                fd = os.open(cmd["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
                os.environ.update(cmd["env"])
                sys.argv = ["mimlab", *cmd["argv"]]
                rc = main(cmd["argv"])
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(rc)
        reply = {"pid": pid}
    elif cmd["op"] == "poll":
        p, status = os.waitpid(cmd["pid"], os.WNOHANG)
        reply = {"rc": os.waitstatus_to_exitcode(status) if p else None}
    else:
        _, status = os.waitpid(cmd["pid"], 0)
        reply = {"rc": os.waitstatus_to_exitcode(status)}
    print(json.dumps(reply), flush=True)
"""


class Zygote:
    """A pre-imported Python process that forks one child per `mimlab` command (see the module docstring)."""

    def __init__(self, cache: Path):
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MIMLAB_CACHE=str(cache))
        env.pop(STALL_ENV, None)
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, text=True, bufsize=1)
        self.live: set[int] = set()
        assert "ready" in self._reply(300)

    def _reply(self, timeout: float = 120) -> dict[str, Any]:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "the zygote process did not answer"
        line = self.proc.stdout.readline()
        assert line, f"the zygote process died (rc {self.proc.poll()})"
        return json.loads(line)

    def _ask(self, **cmd: Any) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def start(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> int:
        pid = self._ask(op="run", argv=[str(a) for a in argv], log=str(log), env=env or {})["pid"]
        self.live.add(pid)
        return pid

    def poll(self, pid: int) -> int | None:
        rc = self._ask(op="poll", pid=pid)["rc"]
        if rc is not None:
            self.live.discard(pid)
        return rc

    def wait(self, pid: int) -> int:
        rc = self._ask(op="wait", pid=pid)["rc"]
        self.live.discard(pid)
        return rc

    def run(self, argv: list[str], log: Path) -> int:
        return self.wait(self.start(argv, log))

    def close(self) -> None:
        for pid in list(self.live):  # children of a failed test (e.g. one still stalled in a write)
            os.kill(pid, signal.SIGKILL)
            self.wait(pid)
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote-cache"))
    yield z
    z.close()


# ------------------------------------------------------------------------------------------------ helpers
def csv_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("step", "").isdigit()]


def temp_files(root: Path) -> list[Path]:
    """Every temporary file under `root` (independent of the pattern mimlab itself cleans up)."""
    return sorted(p for p in root.rglob("*.tmp"))


def kill_at(z: Zygote, argv: list[str], log: Path, point: tuple, csv_path: Path | None = None,
            timeout: float = 120, finish_ok: bool = False) -> dict[str, Any]:
    """Start `argv`, SIGKILL it at `point`; returns what happened (killed or finished first, and when). A run that
    finishes without the write of a "write" point fails the test, unless `finish_ok` (the caller expects that
    the work may have run out of such writes) and it finished cleanly."""
    env: dict[str, str] = {}
    marker = log.with_suffix(".stalled")
    if point[0] == "write":
        env[STALL_ENV] = f"{point[1]}:{point[2]}:{marker}"
    t0 = time.perf_counter()
    pid = z.start(argv, log, env)
    deadline = t0 + timeout
    rc = None
    while time.perf_counter() < deadline:
        rc = z.poll(pid)
        if rc is not None:
            break
        if point[0] == "delay" and time.perf_counter() - t0 >= point[1]:
            break
        if point[0] == "step" and len(csv_rows(csv_path)) >= point[1]:
            break
        if point[0] == "write" and marker.exists():
            break
        time.sleep(0.005)
    else:
        os.kill(pid, signal.SIGKILL)
        z.wait(pid)
        raise AssertionError(f"kill point {point} not reached in {timeout} s ({log})")
    if rc is not None:
        assert point[0] != "write" or (finish_ok and rc == 0), \
            f"{point}: the run finished without the stalled write:\n{log.read_text()[-2000:]}"
        return {"point": point, "killed": False, "rc": rc, "at_s": time.perf_counter() - t0}
    os.kill(pid, signal.SIGKILL)
    rc = z.wait(pid)
    assert rc == -signal.SIGKILL, (rc, log.read_text()[-2000:])
    return {"point": point, "killed": True, "rc": rc, "at_s": round(time.perf_counter() - t0, 3),
            "during_write": point[0] == "write"}


def check_after_kill(out: Path, allowed_steps: set[int]) -> int | None:
    """The kernel released the run lock; a checkpoint, if any, loads safely and holds a checkpoint step."""
    with run_lock(out):
        pass
    ckpt = out / "checkpoints" / "last.pt"
    if not ckpt.exists():
        return None
    step = int(load_checkpoint(ckpt)["step"])
    assert step in allowed_steps, (step, sorted(allowed_steps))
    return step


def load_model(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def report(name: str, outcomes: list[dict[str, Any]], seconds: float) -> None:
    killed = [o for o in outcomes if o["killed"]]
    writes = sum(1 for o in killed if o.get("during_write"))
    print(f"\n[{name}] {len(killed)}/{len(outcomes)} runs killed ({writes} during a write), "
          f"{sum(1 for o in outcomes if o.get('matched'))} resumed runs matched; {seconds:.1f} s")
    for o in outcomes:
        print(f"  {o['point']}: {'killed' if o['killed'] else 'finished first'} at {o['at_s']:.2f} s, "
              f"checkpoint step {o.get('ckpt_step')}, stale temps {o.get('temps', 0)}, "
              f"resumed from {o.get('resumed_from')}, matched {o.get('matched')}")


# ------------------------------------------------------------------------------------------------ pretrain
PRE_STEPS, PRE_SAVE = 40, 3


def pretrain_argv(out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--method", "simmim", "--model", ARCH, "--model-kwargs", KW_TEXT,
            "--data", "builtin?classes=4&per_class=8", "--out", out, "--steps", str(PRE_STEPS), "--batch-size", "8",
            "--lr", "0.05", "--seed", "5", "--deterministic", "--drop-path", "0.1", "--ema", "0.9",
            "--save-every", str(PRE_SAVE), "--log-every", "1", "--no-tensorboard", "--no-progress", "--device",
            "cpu", *extra]


def test_pretrain_sigkill_at_ten_random_points_then_resume(zygote, tmp_path):
    t0 = time.perf_counter()
    rng = random.Random(SEED)
    ref = tmp_path / "ref"
    t_ref = time.perf_counter()
    assert zygote.run(pretrain_argv(ref), tmp_path / "ref.log") == 0, (tmp_path / "ref.log").read_text()
    t_ref = time.perf_counter() - t_ref
    ref_model, ref_ema = load_model(ref / "model.safetensors"), load_model(ref / "model_ema.safetensors")
    ref_losses = [r["loss"] for r in csv_rows(ref / "metrics.csv")]
    assert len(ref_losses) == PRE_STEPS
    saves = [s for s in range(1, PRE_STEPS + 1) if s % PRE_SAVE == 0 or s == PRE_STEPS]

    # 10 kill points: 3 during checkpoint writes, 1 during the model export, 3 at steps, 3 after delays
    points: list[tuple] = [("write", "last.pt", k) for k in rng.sample(range(1, len(saves) + 1), 3)]
    points.append(("write", "model.safetensors", 1))
    points += [("step", k) for k in rng.sample(range(1, PRE_STEPS + 1), 3)]
    points += [("delay", round(rng.uniform(0.0, 0.75 * t_ref), 3)) for _ in range(3)]
    rng.shuffle(points)

    outcomes = []
    for i, point in enumerate(points):
        out = tmp_path / f"run{i}"
        o = kill_at(zygote, pretrain_argv(out), tmp_path / f"run{i}.log", point, out / "metrics.csv")
        o["ckpt_step"] = check_after_kill(out, set(saves)) if o["killed"] else None
        o["temps"] = len(temp_files(out))
        if point[0] == "write" and point[1] == "last.pt":
            assert o["temps"] == 1 and o["ckpt_step"] == (saves[point[2] - 2] if point[2] > 1 else None)
        log = tmp_path / f"run{i}.resume.log"
        assert zygote.run(pretrain_argv(out, "--resume"), log) == 0, log.read_text()[-3000:]
        run = json.loads((out / "run.json").read_text())["result"]
        assert run["finished"] and run["step"] == PRE_STEPS
        o["resumed_from"] = run["resumed_from_step"]
        assert temp_files(out) == []
        assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == PRE_STEPS
        rows = csv_rows(out / "metrics.csv")
        assert [int(r["step"]) for r in rows] == list(range(1, PRE_STEPS + 1))
        assert [r["loss"] for r in rows] == ref_losses
        assert same_tensors(load_model(out / "model.safetensors"), ref_model)
        assert same_tensors(load_model(out / "model_ema.safetensors"), ref_ema)
        o["matched"] = True
        outcomes.append(o)
    report("pretrain", outcomes, time.perf_counter() - t0)
    assert sum(o["killed"] for o in outcomes) >= 8
    assert sum(o["killed"] and o["point"][:2] == ("write", "last.pt") for o in outcomes) == 3


# ------------------------------------------------------------------------------------------------ transfer
TR_STEPS, TR_SAVE = 24, 4


@pytest.fixture(scope="module")
def finegrained(tmp_path_factory):
    from mimlab.data.downstream import generate

    root = tmp_path_factory.mktemp("fg") / "fg"
    generate("finegrained", root, num_classes=3, train_per_class=4, val_per_class=2, size=16)
    return root


def transfer_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["transfer", "--task", "classify", "--backbone", ARCH, "--model-kwargs", KW_TEXT, "--data", data,
            "--out", out, "--steps", str(TR_STEPS), "--batch-size", "4", "--save-every", str(TR_SAVE),
            "--no-progress", "--device", "cpu", *extra]


def test_transfer_sigkill_at_random_points_then_resume(zygote, finegrained, tmp_path):
    t0 = time.perf_counter()
    rng = random.Random(SEED + 1)
    ref = tmp_path / "ref"
    t_ref = time.perf_counter()
    assert zygote.run(transfer_argv(finegrained, ref), tmp_path / "ref.log") == 0, (tmp_path / "ref.log").read_text()
    t_ref = time.perf_counter() - t_ref
    ref_report = json.loads((ref / "metrics.json").read_text())
    ref_state = load_checkpoint(ref / "checkpoints" / "last.pt")["model"]
    ref_losses = [r["loss"] for r in csv_rows(ref / "metrics.csv")]
    saves = [s for s in range(1, TR_STEPS + 1) if s % TR_SAVE == 0]

    points: list[tuple] = [("write", "last.pt", k) for k in rng.sample(range(1, len(saves) + 1), 3)]
    points.append(("write", "metrics.json", 1))
    # (the reference run also pays one-off costs, so delays stay within the first half of its time)
    points += [("step", k) for k in rng.sample(range(1, TR_STEPS + 1), 3)]
    points += [("delay", round(rng.uniform(0.0, 0.5 * t_ref), 3)) for _ in range(3)]
    rng.shuffle(points)

    outcomes = []
    for i, point in enumerate(points):
        out = tmp_path / f"run{i}"
        o = kill_at(zygote, transfer_argv(finegrained, out), tmp_path / f"run{i}.log", point, out / "metrics.csv")
        o["ckpt_step"] = check_after_kill(out, set(saves)) if o["killed"] else None
        o["temps"] = len(temp_files(out))
        log = tmp_path / f"run{i}.resume.log"
        assert zygote.run(transfer_argv(finegrained, out, "--resume"), log) == 0, log.read_text()[-3000:]
        rep = json.loads((out / "metrics.json").read_text())
        o["resumed_from"] = rep["train"]["resumed_from"]
        assert rep["train"]["steps"] == TR_STEPS and temp_files(out) == []
        assert rep["metrics"] == ref_report["metrics"] and rep["baseline"] == ref_report["baseline"]
        state = load_checkpoint(out / "checkpoints" / "last.pt")
        assert state["step"] == TR_STEPS and same_tensors(state["model"], ref_state)
        assert [r["loss"] for r in csv_rows(out / "metrics.csv")] == ref_losses
        o["matched"] = True
        outcomes.append(o)
    report("transfer", outcomes, time.perf_counter() - t0)
    assert len(outcomes) == 10 and sum(o["killed"] for o in outcomes) >= 8


# ------------------------------------------------------------------------------------------------ reproduce
MINI = MINI_STUDY


def comparable_summary(out: Path) -> str:
    """summary.json without what legitimately differs between runs: timings, stage keys, the output folder."""
    s = json.loads((out / "summary.json").read_text())
    s.pop("stages", None)
    s.pop("paths", None)
    for info in s.get("pretrain", {}).values():
        info.pop("img_per_s", None)
    return json.dumps(s, sort_keys=True, indent=1).replace(str(out.resolve()), "<OUT>").replace(str(out), "<OUT>")


def test_reproduce_sigkill_at_random_points_then_rerun(zygote, tmp_path):
    t0 = time.perf_counter()
    rng = random.Random(SEED + 2)
    cfg = tmp_path / "mini.yaml"
    cfg.write_text(MINI)

    def argv(out: Path) -> list[str]:
        return ["reproduce", "--config", cfg, "--out", out, "--quiet", "--device", "cpu"]

    # the interrupted study first (so its first run also builds the data caches), then the reference
    out = tmp_path / "study"
    # ten kills of one study, in the order its work happens (each restart skips the stages already finished)
    delay = lambda: ("delay", round(rng.uniform(0.5, 4.0), 3))  # noqa: E731
    points = [("write", "stage.json", rng.randint(2, 4)), delay(), ("write", "last.pt", 1), delay(),
              ("write", "stage.json", rng.randint(1, 3)), ("write", "last.pt", 1), delay(),
              ("write", "stage.json", rng.randint(1, 3)), delay(), ("write", "summary.json", 1)]
    outcomes = []
    for i, point in enumerate(points):
        o = kill_at(zygote, argv(out), tmp_path / f"run{i}.log", point, timeout=300, finish_ok=True)
        if not o["killed"] and point[0] == "write":
            # the study had fewer writes of that file left than the point asked for (the delay kills before it
            # let more stages finish than usual: stages run faster or slower from machine to machine), so it
            # completed: kill its rerun at the one write every run makes, its summary
            point = ("write", "summary.json", 1)
            o = kill_at(zygote, argv(out), tmp_path / f"run{i}b.log", point, timeout=300)
            (tmp_path / f"run{i}b.log").replace(tmp_path / f"run{i}.log")
        if o["killed"]:
            with run_lock(out):
                pass
            for ckpt in out.glob("stages/**/checkpoints/last.pt"):
                load_checkpoint(ckpt)
        o["temps"] = len(temp_files(out))
        running = [line.split()[-1] for line in (tmp_path / f"run{i}.log").read_text().splitlines()
                   if line.startswith("[run ]")]
        o["where"] = (f"in stage {running[-1] if running else '(setup)'}, "
                      f"{len(list(out.glob('stages/**/stage.json')))} stages finished")
        outcomes.append(o)
    assert zygote.run(argv(out), tmp_path / "final.log") == 0, (tmp_path / "final.log").read_text()[-3000:]
    ref = tmp_path / "ref"
    assert zygote.run(argv(ref), tmp_path / "ref.log") == 0, (tmp_path / "ref.log").read_text()[-3000:]

    assert temp_files(out) == []
    pending = list(out.glob("stages/**/stage.pending.json"))
    assert pending == []
    assert comparable_summary(out) == comparable_summary(ref)
    summary = json.loads((out / "summary.json").read_text())
    assert all(info.get("steps", 4) == 4 for info in summary["pretrain"].values())
    for o in outcomes:
        o["matched"] = True         # the final rerun's summary equals the uninterrupted study's
        o["resumed_from"] = o.pop("where")
    report("reproduce", outcomes, time.perf_counter() - t0)
    assert len(outcomes) == 10 and sum(o["killed"] for o in outcomes) >= 8
