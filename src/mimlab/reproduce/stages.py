"""Content-addressed stage cache for `mimlab reproduce`.

A stage is named (e.g. `pretrain/simmim`) and keyed by the sha256 of its config (a verb's config object through
`mimlab.utils.config.key_dict`, or a plain dict) plus the keys of the stages it reads from. Paths inside the study
folder are written relative to it, in keys and in recorded outputs (`<study>/stages/...`), so a study folder that
is moved or copied keeps its finished stages. Its outputs live in `ROOT/stages/<name>/` with a `stage.json` holding the key, written atomically when
the stage finishes, together with a `run_id` that is new each time the stage actually runs. A stage's key covers
the `run_id`s of its inputs, so rerunning a stage (its config changed, `--force`, or its folder deleted) changes
the keys of every stage downstream of it and they rerun too, while unrelated stages stay cached. A missing
`stage.json` (interrupted) reruns the stage in the same folder, where engine checkpoints let a training stage
resume at its step.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mimlab.utils.config import key_dict
from mimlab.utils.io import atomic_write_json

MARKER = "stage.json"
PENDING = "stage.pending.json"
STUDY = "<study>"               # the study folder in keys and recorded outputs


def relative_to_study(obj: Any, root: Path) -> Any:
    """`obj` with every occurrence of the study folder's path in its strings replaced by `<study>`."""
    prefix = str(root)
    if isinstance(obj, dict):
        return {k: relative_to_study(v, root) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [relative_to_study(v, root) for v in obj]
    if isinstance(obj, str):
        return obj.replace(prefix, STUDY) if prefix in obj else obj
    return obj


def in_study(obj: Any, root: Path) -> Any:
    """The inverse of `relative_to_study` for the study folder's current place."""
    if isinstance(obj, dict):
        return {k: in_study(v, root) for k, v in obj.items()}
    if isinstance(obj, list):
        return [in_study(v, root) for v in obj]
    if isinstance(obj, str) and STUDY in obj:
        return obj.replace(STUDY, str(root))
    return obj


def stable_hash(obj: Any) -> str:
    """sha256 of a canonical JSON encoding (sorted keys; tuples as lists; paths as strings)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _outputs_exist(outputs: dict[str, Any], stage_dir: Path) -> bool:
    """Every output that names a file inside the stage folder must still be there."""
    root = stage_dir.resolve()
    for v in outputs.values():
        if isinstance(v, str) and v.startswith(str(root)) and not Path(v).exists():
            return False
    return True


@dataclass
class Stage:
    """A stage of the study before it runs: its name, the stages it reads from, the config that keys it, and the
    function that runs it in its folder and returns its outputs."""
    name: str
    deps: tuple[str, ...]
    config: Any
    build: Callable[[Path], dict[str, Any]]


@dataclass
class StageRecord:
    name: str
    key: str
    run_id: str
    dir: Path
    skipped: bool
    seconds: float
    outputs: dict[str, Any] = field(default_factory=dict)


class StageRunner:
    """Runs stages in order with caching; `force` names stages (or prefixes like `transfer`) to rerun."""

    def __init__(self, root: str | Path, force: tuple[str, ...] = (), log: Callable[[str], None] = print):
        self.root = Path(root).resolve()
        self.force = tuple(force)
        self.log = log
        self.records: dict[str, StageRecord] = {}

    def stage_dir(self, name: str) -> Path:
        return self.root / "stages" / name

    def _forced(self, name: str) -> bool:
        return any(name == f or name.startswith(f.rstrip("/") + "/") for f in self.force)

    def key(self, name: str, config: Any, deps: tuple[str, ...] = ()) -> str:
        conf = config if isinstance(config, dict) else key_dict(config)
        return stable_hash({"name": name, "config": relative_to_study(conf, self.root),
                            "deps": {d: self.records[d].run_id for d in deps}})

    def lookup(self, name: str, config: Any, deps: tuple[str, ...] = ()) -> StageRecord | None:
        """The finished stage's record if its folder holds a run with this key (and its dependencies are known),
        else None; nothing runs."""
        if name in self.records:
            return self.records[name]
        if any(d not in self.records for d in deps) or self._forced(name):
            return None
        key = self.key(name, config, deps)
        d = self.stage_dir(name)
        marker = d / MARKER
        if not marker.is_file():
            return None
        try:
            done = json.loads(marker.read_text())
        except ValueError:
            return None
        outputs = in_study(done.get("outputs", {}), self.root)
        if done.get("key") != key or not _outputs_exist(outputs, d):
            return None
        rec = self.records[name] = StageRecord(name, key, done["run_id"], d, True, 0.0, outputs)
        return rec

    def lock_dir(self, name: str) -> Path:
        return self.root / "locks" / name.replace("/", "__")

    def run(self, name: str, config: Any, fn: Callable[[Path], dict[str, Any]],
            deps: tuple[str, ...] = (), note: str = "") -> StageRecord:
        """Run `fn(stage_dir) -> outputs` unless a finished stage with the same key exists. `config`: the stage's
        config object (a dataclass; its `NOT_IN_KEY` fields are left out of the key) or a plain dict. The stage is
        locked while it runs (`ROOT/locks/NAME`), so stages run by separate processes (`--stage`) never collide."""
        from mimlab.utils.io import remove_stale_temps
        from mimlab.utils.lock import run_lock

        missing = [d for d in deps if d not in self.records]
        if missing:
            raise RuntimeError(f"stage {name} depends on stages not run yet: {missing}")
        done = self.lookup(name, config, deps)
        if done is not None:
            self.log(f"[skip] {name} (cached {done.key[:10]})")
            return done
        with run_lock(self.lock_dir(name), verb=f"mimlab reproduce, stage {name}"):
            done = self.lookup(name, config, deps)      # finished by another process while we waited? (no wait)
            if done is not None:
                return done
            if self.stage_dir(name).exists():
                remove_stale_temps(self.stage_dir(name), recursive=True)   # a killed attempt's half-written files
            return self._run(name, config, fn, deps, note)

    def _run(self, name: str, config: Any, fn: Callable[[Path], dict[str, Any]],
             deps: tuple[str, ...], note: str = "") -> StageRecord:
        key = self.key(name, config, deps)
        d = self.stage_dir(name)
        marker = d / MARKER
        pending = d / PENDING
        stale = marker.is_file() or self._forced(name) or (
            pending.is_file() and json.loads(pending.read_text()).get("key") != key)
        if stale and d.exists():
            shutil.rmtree(d)                      # finished with another config, or forced: start clean
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_json(pending, {"name": name, "key": key})   # an interrupted run resumes only with this key
        self.log(f"[run ] ({note}) {name}" if note else f"[run ] {name}")      # the name last (scripts read it)
        t0 = time.perf_counter()
        outputs = fn(d) or {}
        seconds = time.perf_counter() - t0
        run_id = stable_hash({"key": key, "finished": time.time_ns()})
        conf = config if isinstance(config, dict) else key_dict(config)
        atomic_write_json(marker, {"name": name, "key": key, "run_id": run_id,
                                   "config": relative_to_study(conf, self.root), "deps": list(deps),
                                   "outputs": relative_to_study(outputs, self.root), "seconds": seconds})
        pending.unlink(missing_ok=True)
        rec = StageRecord(name, key, run_id, d, False, seconds, outputs)
        self.records[name] = rec
        return rec
