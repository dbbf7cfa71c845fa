"""Atomic file writes, a clear error on a full disk, file hashing, and quiet weights-only loading."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from mimlab.errors import MimlabError

# Test-only hook (never set in normal use): "NAME:K:MARKER" makes the K-th atomic write of a file called NAME in
# this process stop after the temporary file is complete and fsynced but before it is renamed over NAME: it
# writes MARKER (containing the temporary path) and sleeps, so a crash test can SIGKILL the process exactly
# "during a checkpoint write". See tests/test_reliability_crash.py.
STALL_ENV = "MIMLAB_TEST_STALL_WRITE"
_stall_counts: dict[str, int] = {}

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_FULL_TEXT = ("no space left on device", "disk quota exceeded", "os error 28")


@contextmanager
def no_pickle_warning() -> Iterator[None]:
    """Silence torch's FutureWarning about `weights_only` (two lines on stderr, in the torch versions that print
    it) around a load that is weights-only already: a refused file must get its one-line error and nothing else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*weights_only", category=FutureWarning)
        yield


def is_disk_full(exc: BaseException, directory: str | os.PathLike | None = None) -> bool:
    """Whether `exc` (or an exception it was raised from) means the disk is full.

    Libraries report a full disk differently: Python raises OSError(ENOSPC), safetensors a SafetensorError
    whose text says "No space left on device", and ``torch.save(obj, path)`` an opaque "unexpected pos"
    RuntimeError; for the last, a filesystem with no free block left at the time of the error also counts.
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return True
        if any(t in str(e).lower() for t in _FULL_TEXT):
            return True
        e = e.__cause__ or e.__context__
    if directory is not None and not isinstance(exc, MimlabError):
        try:
            st = os.statvfs(directory)
        except OSError:
            return False
        return st.f_blocks > 0 and st.f_bavail == 0   # (pseudo filesystems report no blocks at all)
    return False


class DiskFullError(MimlabError, OSError):
    """A write ran out of disk space: a `MimlabError` (the CLI prints it on one line and exits 2) that is also
    an ``OSError(ENOSPC)``, so code that tolerates failed optional writes (``except OSError``) still does."""

    def __init__(self, message: str, path: str | os.PathLike):
        OSError.__init__(self, errno.ENOSPC, message, str(path))
        self.message = message

    def __str__(self) -> str:
        return self.message


def disk_full_error(path: str | os.PathLike, *, atomic: bool = True) -> DiskFullError:
    """The one-line user-facing error for a write that ran out of space (`atomic`: written by `atomic_path`)."""
    path = Path(path)
    kept = (f"the previous {path.name} (if any) is unchanged and no partial file was left behind" if atomic else
            "a partly written last line is dropped when the run resumes")
    return DiskFullError(f"disk full: no space left on device while writing {path}; {kept}. Free some space and "
                         "run the same command again (training continues from its last checkpoint with resume=True "
                         "(--resume))", path)


def _test_stall(path: Path, tmp: Path) -> None:
    spec = os.environ.get(STALL_ENV)
    if not spec:
        return
    name, k, marker = spec.split(":", 2)
    if path.name != name:
        return
    _stall_counts[name] = _stall_counts.get(name, 0) + 1
    if _stall_counts[name] == int(k):
        Path(marker).write_text(str(tmp))
        time.sleep(600)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed over `path`.

    A crash or an exception at any point leaves the previous file (if any) intact; an exception removes the
    temporary file (a crash leaves it: `remove_stale_temps` cleans those up). Running out of disk space
    raises a one-line `MimlabError` naming `path`.
    """
    path = Path(path)
    tmp_path: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        tmp_path = Path(tmp)
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions a plain open() would
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        _test_stall(path, tmp_path)
        os.replace(tmp_path, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except Exception as e:
        full = is_disk_full(e, path.parent if path.parent.exists() else None)
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()
        if full:
            raise disk_full_error(path) from None
        raise
    finally:
        if tmp_path is not None and tmp_path.exists() and tmp_path != path:
            tmp_path.unlink()


_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # what tempfile.mkstemp makes for atomic_path


def temp_files(directory: str | os.PathLike, name: str | None = None, *, recursive: bool = False) -> list[Path]:
    """The temporary files `atomic_path` leaves beside `name` (or any file) in `directory` after a crash."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = []
    for root, _, files in (os.walk(d) if recursive else [(str(d), None, os.listdir(d))]):
        for f in files:
            if _TEMP_NAME.match(f) and (name is None or f.startswith(f".{name}.")) and os.path.isfile(
                    os.path.join(root, f)):
                found.append(Path(root) / f)
    return sorted(found)


def remove_stale_temps(directory: str | os.PathLike, names: tuple[str, ...] | None = None, *,
                       recursive: bool = False) -> list[Path]:
    """Delete the temporary files a crashed `atomic_path` left in `directory` (beside `names`, if given; in
    every sub-folder too with `recursive`).

    Call it only while holding the directory's run lock (`mimlab.utils.lock`): then no live writer owns them.
    """
    removed = []
    candidates = (temp_files(directory, recursive=recursive) if names is None else
                  [t for n in names for t in temp_files(directory, n, recursive=recursive)])
    for p in candidates:
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=True) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_json(path: str | os.PathLike) -> Any:
    """A JSON file's content (the files mimlab itself wrote: errors are not dressed up)."""
    return json.loads(Path(path).read_text())
