"""One run per output directory: an exclusive, non-blocking `fcntl.flock` on ``DIR/.mimlab.lock``.

The lock belongs to the open file, so the kernel releases it when the process exits in any way, SIGKILL
included: a killed run never leaves a stale lock behind (the file itself stays; its content only describes
the current holder). A second run into the same directory fails at once with a message naming the directory
and the holder's pid and command. When the recorded holder is already dead (killed, and its forked workers or its
teardown still hold the file), the new run waits up to DEAD_HOLDER_GRACE_S for them instead of being refused by a
dead process. Linux/macOS only (fcntl).
"""
from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from mimlab.errors import ConfigError, MimlabError

LOCK_NAME = ".mimlab.lock"
DEAD_HOLDER_GRACE_S = 15.0     # how long a lock whose recorded holder has died may stay held by its leftovers


def _holder(fd: int) -> str:
    """'pid N (VERB): COMMAND, started T' from the lock file, as far as the holder has written it."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 65536).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info.get("pid"):
        return "a process that has not written its pid yet"
    return f"pid {info['pid']} ({info.get('verb', '?')}): {info.get('command', '?')}, started {info.get('started', '?')}"


def _holder_pid(fd: int) -> int | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return int(json.loads(os.read(fd, 65536).decode() or "{}").get("pid") or 0) or None
    except (OSError, ValueError, TypeError):
        return None


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (a killed process is a zombie until its parent reaps it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _acquire(fd: int, grace_s: float = DEAD_HOLDER_GRACE_S) -> None:
    """Take the lock; if the recorded holder is dead, wait up to `grace_s` for the processes that inherited its
    file (forked DataLoader workers, a process still being torn down) to let go. BlockingIOError if it stays held."""
    deadline = None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pid = _holder_pid(fd)
            if pid is None or _alive(pid):
                raise
            deadline = deadline or time.monotonic() + grace_s
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _command() -> str:
    """This process's command line, with `python -m mimlab` / the console script shown as `mimlab`."""
    argv0 = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    prog = "mimlab" if argv0 in ("mimlab", "__main__.py") else argv0
    return " ".join([prog, *sys.argv[1:]])[:2000]


@contextmanager
def run_lock(directory: str | os.PathLike, *, verb: str = "mimlab") -> Iterator[Path]:
    """Hold the run lock of `directory` (created if missing) for the duration of the block; `verb` (e.g.
    "mimlab pretrain") is recorded for the message another run gets.

    Raises `MimlabError` at once if another process holds it. Only one holder per directory, even within a
    process: taking the same directory's lock twice without releasing it fails too.
    """
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise ConfigError("out", f"{d} exists and is not a directory")
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise MimlabError(f"cannot create the run lock {d / LOCK_NAME}: {e.strerror or e}") from None
    try:
        try:
            _acquire(fd)
        except BlockingIOError:
            raise MimlabError(f"{d} is in use by another run, {_holder(fd)}; wait for it to finish or choose "
                              "another output directory") from None
        info = {"pid": os.getpid(), "verb": verb, "command": _command(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        except OSError:
            pass  # a full disk must not stop the run here; the holder is then just reported without a pid
        try:
            yield d / LOCK_NAME
        finally:
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
