"""Files on disk under stress: untrusted training checkpoints, a full disk, and two runs in one directory."""
from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from mimlab.cli import main
from mimlab.engine.state import STATE_FORMAT, load_checkpoint
from mimlab.errors import MimlabError
from mimlab.utils.lock import LOCK_NAME, run_lock

ARCH = "vit_tiny_patch16_224"
KW_TEXT = "img_size=16,patch_size=4,depth=2,embed_dim=32,num_heads=2"
DATA = "builtin?classes=4&per_class=8"

pytestmark = pytest.mark.usefixtures("one_thread", "isolated_cache")


def pretrain_args(out: Path, *extra: str, steps: int = 6) -> list[str]:
    return ["pretrain", "--method", "simmim", "--model", ARCH, "--model-kwargs", KW_TEXT, "--data", DATA,
            "--out", str(out), "--steps", str(steps), "--batch-size", "8", "--lr", "0.05", "--deterministic",
            "--save-every", "2", "--no-tensorboard", "--no-progress", "--device", "cpu", *extra]


def error_line(err: str, verb: str) -> str:
    """The CLI's error: exactly one line `mimlab VERB: error: ...`, and no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"mimlab {verb}: error:")]
    assert len(lines) == 1, err
    return lines[0]


def tmp_leftovers(root: Path) -> list[Path]:
    return sorted(root.rglob("*.tmp"))


# ------------------------------------------------------------------------------ untrusted training checkpoints
class _WritesAFile:
    """Unpickling this runs `exec`: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",))


def test_crafted_checkpoint_is_refused_by_resume_without_running_code(tmp_path, capsys):
    out = tmp_path / "run"
    ckpt = out / "checkpoints" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    marker = tmp_path / "marker.txt"
    for kind in ("torch.save", "raw pickle"):
        payload = {"format": STATE_FORMAT, "step": 1, "model": _WritesAFile(marker)}
        if kind == "torch.save":
            torch.save(payload, ckpt)
        else:
            ckpt.write_bytes(pickle.dumps(payload, protocol=2))  # reaches the GLOBAL (protocol 4 stops earlier)
        assert main(pretrain_args(out, "--resume")) == 2
        line = error_line(capsys.readouterr().err, "pretrain")
        assert f"refusing to load {ckpt}" in line and "exec" in line and "never runs code" in line, line
        assert not marker.exists()
    # the file really is malicious: an unsafe load runs its code
    pickle.loads(ckpt.read_bytes())
    assert marker.read_text() == "code ran"


def test_old_truncated_and_foreign_checkpoints_get_one_line_errors(tmp_path):
    import numpy as np

    path = tmp_path / "last.pt"
    torch.save({"format": "mimlab-train-state/1", "rng": [{"numpy": np.random.get_state()}]}, path)
    with pytest.raises(MimlabError, match=r"refusing to load .*last\.pt.*numpy.*before format 2") as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)
    good = tmp_path / "good.pt"
    torch.save({"format": STATE_FORMAT, "step": 3}, good)
    path.write_bytes(good.read_bytes()[:100])
    with pytest.raises(MimlabError, match=r"cannot read checkpoint .*last\.pt.*corrupt") as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)
    torch.save({"step": 3}, path)
    with pytest.raises(MimlabError, match=r"not a mimlab training checkpoint of format"):
        load_checkpoint(path)


# ------------------------------------------------------------------------------ full disk (simulated)
def _enospc_on_save(monkeypatch, on_call: int) -> None:
    """torch.save writes part of the file, then fails like a full disk, on its `on_call`-th call."""
    real = torch.save
    calls = {"n": 0}

    def fake(obj, f, *a, **kw):
        calls["n"] += 1
        if calls["n"] == on_call:
            f.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", fake)


def test_disk_full_during_a_pretrain_checkpoint_keeps_the_previous_one(tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file

    assert main(pretrain_args(tmp_path / "ref")) == 0
    out = tmp_path / "run"
    ckpt = out / "checkpoints" / "last.pt"
    with monkeypatch.context() as m:
        _enospc_on_save(m, on_call=2)                             # the save at step 4 fails
        assert main(pretrain_args(out)) == 2
    line = error_line(capsys.readouterr().err, "pretrain")
    assert "disk full" in line and str(ckpt) in line and "--resume" in line, line
    assert load_checkpoint(ckpt)["step"] == 2                     # the previous checkpoint is intact
    assert tmp_leftovers(out) == [] and not (out / "model.safetensors").exists()
    # space freed: the run continues exactly
    assert main(pretrain_args(out, "--resume")) == 0
    a, b = load_file(str(tmp_path / "ref" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _enospc_on_write_text(monkeypatch, name: str) -> None:
    """Writing the temporary file of `name` (atomic_write_json) writes half of it, then fails like a full disk."""
    real = Path.write_text

    def fake(self, data, *a, **kw):
        if self.name.startswith(f".{name}."):
            real(self, data[: len(data) // 2], *a, **kw)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data, *a, **kw)

    monkeypatch.setattr(Path, "write_text", fake)


def test_disk_full_while_writing_a_transfer_result_keeps_the_previous_result(tmp_path, capsys, monkeypatch):
    from mimlab.data.downstream import generate

    data = tmp_path / "fg"
    generate("finegrained", data, num_classes=3, train_per_class=3, val_per_class=2, size=16)
    out = tmp_path / "tr"
    args = ["transfer", "--task", "classify", "--backbone", ARCH, "--model-kwargs", KW_TEXT, "--data", str(data),
            "--out", str(out), "--batch-size", "4", "--no-progress", "--device", "cpu"]
    assert main([*args, "--steps", "2"]) == 0
    before = (out / "metrics.json").read_text()
    _enospc_on_write_text(monkeypatch, "metrics.json")
    assert main([*args, "--steps", "3", "--resume"]) == 2
    line = error_line(capsys.readouterr().err, "transfer")
    assert "disk full" in line and str(out / "metrics.json") in line, line
    assert (out / "metrics.json").read_text() == before and json.loads(before)["train"]["steps"] == 2
    assert tmp_leftovers(out) == []
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 3   # training itself was saved


MINI = """
preset: quick
model_kwargs: img_size=32,patch_size=8,depth=2,embed_dim=32,num_heads=2
pretrain_data: builtin:fractal-leaves?classes=4&per_class=8&seed=0
pretrain_steps: 2
pretrain_batch_size: 16
probe_images: 8
probe_batch_size: 8
bootstrap: 5
tasks: [classify]
transfer_steps: {classify: 2}
transfer_batch_size: 8
ablation_blocks: 0
transfer_data:
  classify: {kind: finegrained, num_classes: 3, train_per_class: 4, val_per_class: 2, size: 32}
"""


@pytest.mark.slow
def test_disk_full_while_writing_the_study_summary_keeps_the_previous_one(tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "mini.yaml"
    cfg.write_text(MINI)
    out = tmp_path / "study"
    args = ["reproduce", "--config", str(cfg), "--out", str(out), "--quiet", "--device", "cpu"]
    assert main(args) == 0
    before = (out / "summary.json").read_text()
    capsys.readouterr()
    _enospc_on_write_text(monkeypatch, "summary.json")
    assert main(args) == 2
    line = error_line(capsys.readouterr().err, "reproduce")
    assert "disk full" in line and str(out / "summary.json") in line, line
    assert (out / "summary.json").read_text() == before
    assert tmp_leftovers(out) == []


# ------------------------------------------------------------------------------ full disk (a real tmpfs)
FULL_DISK_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from mimlab.cli import main
    from mimlab.engine.state import load_checkpoint
    out, report, argv = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    rc = main(argv)
    ckpt = out / "checkpoints" / "last.pt"
    step = load_checkpoint(ckpt)["step"] if ckpt.exists() else None
    report.write_text(json.dumps({"rc": rc, "step": step, "tmp": [str(p) for p in out.rglob("*.tmp")]}))
""")


@pytest.mark.slow
def test_a_really_full_tmpfs_during_a_checkpoint(tmp_path):
    """`unshare` gives an unprivileged user a private tmpfs of a few hundred KiB: the second checkpoint does not
    fit. Skipped where user namespaces are disabled."""
    unshare = shutil.which("unshare")
    probe = subprocess.run([unshare, "-Urm", "sh", "-c", f"mount -t tmpfs -o size=64k none {tmp_path}"],
                           capture_output=True) if unshare else None
    if probe is None or probe.returncode != 0:
        pytest.skip("cannot mount a private tmpfs (no unshare or user namespaces disabled)")
    ref = tmp_path / "ref"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # one checkpoint fits, two (the new one's temporary file beside the previous checkpoint) do not
    assert main(pretrain_args(ref, steps=2)) == 0
    size = (ref / "checkpoints" / "last.pt").stat().st_size
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out, rep = mnt / "run", tmp_path / "report.json"
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK_SCRIPT)
    argv = pretrain_args(out, steps=4)
    cmd = (f"mount -t tmpfs -o size={int(size * 1.6) // 4096 * 4096} none {mnt} && "
           f"exec {sys.executable} {script} {out} {rep} " + " ".join(f"'{a}'" for a in argv))
    done = subprocess.run([unshare, "-Urm", "sh", "-c", cmd], capture_output=True, text=True, env=env,
                          timeout=300)
    result = json.loads(rep.read_text())
    line = error_line(done.stderr, "pretrain")
    assert result["rc"] == 2 and "disk full" in line and str(out / "checkpoints" / "last.pt") in line, done.stderr
    assert result["step"] == 2 and result["tmp"] == []


# ------------------------------------------------------------------------------ two runs, one directory
def test_run_lock_is_exclusive_and_released(tmp_path):
    with run_lock(tmp_path / "d") as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(MimlabError, match=rf"{tmp_path / 'd'} is in use by another run, pid {os.getpid()} "):
            with run_lock(tmp_path / "d"):
                pass
    with run_lock(tmp_path / "d"):                                  # released
        pass
    (tmp_path / "f").write_text("x")
    with pytest.raises(MimlabError, match="not a directory"):
        with run_lock(tmp_path / "f"):
            pass


HOLDER = textwrap.dedent("""
    import sys, time
    from mimlab.utils.lock import run_lock
    with run_lock(sys.argv[1], verb="test holder"):
        print("locked", flush=True)
        time.sleep(600)
""")


def _wait_for_lock(path: Path, pid: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if json.loads(path.read_text() or "{}").get("pid") == pid:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} never took {path}")


def test_transfer_and_reproduce_refuse_a_locked_directory(tmp_path, capsys):
    out = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        cfg = tmp_path / "mini.yaml"
        cfg.write_text(MINI)
        for verb, args in (("transfer", ["transfer", "--task", "classify", "--backbone", ARCH, "--data",
                                         str(tmp_path / "nodata"), "--out", str(out), "--no-progress"]),
                           ("reproduce", ["reproduce", "--config", str(cfg), "--out", str(out), "--quiet"]),
                           ("pretrain", pretrain_args(out))):
            t0 = time.perf_counter()
            assert main(args) == 2
            line = error_line(capsys.readouterr().err, verb)
            assert time.perf_counter() - t0 < 10
            assert f"{out} is in use by another run, pid {holder.pid} (test holder): " in line, line
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing was written beside the lock
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_two_pretrain_processes_one_directory_and_no_stale_lock_after_sigkill(tmp_path, capsys):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "mimlab", *pretrain_args(out, steps=100000)],
                             env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_lock(out / LOCK_NAME, first.pid)
        deadline = time.time() + 120
        while not (out / "checkpoints" / "last.pt").exists() and time.time() < deadline:
            time.sleep(0.05)
        assert main(pretrain_args(out, "--resume")) == 2               # the second run fails at once ...
        line = error_line(capsys.readouterr().err, "pretrain")
        assert f"{out} is in use by another run, pid {first.pid} (mimlab pretrain): mimlab pretrain " in line
        assert first.poll() is None                                    # ... and the first is unharmed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] % 2 == 0
    # the kernel dropped the dead run's lock: resuming works at once
    assert main(pretrain_args(out, "--overwrite", steps=2)) == 0


def test_a_dead_holders_lock_kept_by_its_forked_child_is_waited_for_not_refused(tmp_path):
    """The race `make test` hit: a SIGKILLed run's forked child (a DataLoader worker) still holds the inherited lock
    file for a moment. The next run waits for it (the recorded holder is dead) instead of naming a dead pid."""
    import signal
    import subprocess
    import sys
    import time

    from mimlab.utils.lock import run_lock

    code = f"""
import os, signal, sys, time
from mimlab.utils.lock import run_lock
with run_lock({str(tmp_path)!r}, verb="holder"):
    if os.fork() == 0:              # the child inherits the locked file, like a DataLoader worker
        time.sleep(1.5)
        os._exit(0)
    print("locked", flush=True)
    time.sleep(60)
"""
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    t0 = time.monotonic()
    with run_lock(tmp_path, verb="next"):             # refused before the fix: "in use by another run, pid N"
        waited = time.monotonic() - t0
    assert 0.0 <= waited < 10.0

    # a live holder is still refused at once
    q = subprocess.Popen([sys.executable, "-c", code.replace("time.sleep(1.5)", "time.sleep(0)")],
                         stdout=subprocess.PIPE, text=True)
    assert q.stdout.readline().strip() == "locked"
    t0 = time.monotonic()
    with pytest.raises(MimlabError, match="is in use by another run, pid"):
        with run_lock(tmp_path, verb="third"):
            pass
    assert time.monotonic() - t0 < 1.0
    q.kill()
    q.wait()
