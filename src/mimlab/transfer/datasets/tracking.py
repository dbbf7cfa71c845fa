"""Single-object tracking sequences in the GOT-10k and LaSOT layouts.

- GOT-10k: `ROOT/{train,val}/<sequence>/00000001.jpg ...` + `groundtruth.txt` (optional `list.txt`).
- LaSOT: `ROOT/<class>/<class>-N/img/00000001.jpg ...` + `ROOT/<class>/<class>-N/groundtruth.txt`; the split is
  `ROOT/{train,val,test}/...` or, for the official tree, `testing_set.txt` (and optionally `training_set.txt`)
  naming the sequences.
`groundtruth.txt` has one `x,y,w,h` line per frame (top-left corner and size, pixels); commas, tabs or spaces
separate the numbers. Boxes with NaN or a non-positive size mark frames without a valid target (not scored). A box
that does not intersect its frame is refused (the frame size is the sequence's first frame's: a video has one). A
`groundtruth.txt` with fewer lines than frames is refused, except one box in an evaluation split: the layout of a
test split whose later ground truth is withheld (GOT-10k test), loaded with `first_frame_only` set (not scored).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mimlab.data.images import image_files
from mimlab.errors import ConfigError, MimlabError
from mimlab.transfer.datasets.common import read_text


@dataclass
class Sequence:
    name: str
    frames: list[Path]
    boxes: np.ndarray  # (N, 4) x, y, w, h
    groundtruth: Path | None = None  # the groundtruth.txt the boxes came from
    lines: list[int] | None = None  # the line of groundtruth.txt of each box
    first_frame_only: bool = False  # a test split's layout: one box, later ground truth withheld; not scored

    @property
    def valid(self) -> np.ndarray:
        b = self.boxes
        return np.isfinite(b).all(1) & (b[:, 2] > 0) & (b[:, 3] > 0)


def parse_groundtruth(path: str | Path) -> np.ndarray:
    """(N, 4) float array of x, y, w, h; one line per frame, separated by commas, tabs or spaces."""
    return _parse_groundtruth(path)[0]


def _parse_groundtruth(path: str | Path) -> tuple[np.ndarray, list[int]]:
    """The boxes and the line number of each (blank lines are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise MimlabError(f"groundtruth file not found: {path}")
    rows, linenos = [], []
    for lineno, line in enumerate(read_text(path, "groundtruth file").splitlines(), 1):
        if not line.strip():
            continue
        parts = [p for p in re.split(r"[,\t ]+", line.strip()) if p]
        if len(parts) != 4:
            raise MimlabError(f"{path}:{lineno}: expected 4 numbers x,y,w,h, got {len(parts)} ('{line.strip()}')")
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            raise MimlabError(f"{path}:{lineno}: not numbers: '{line.strip()}'") from None
        if any(math.isinf(v) for v in vals):
            raise MimlabError(f"{path}:{lineno}: infinite value in '{line.strip()}'")
        rows.append(vals)
        linenos.append(lineno)
    if not rows:
        raise MimlabError(f"{path}: no boxes")
    return np.asarray(rows, dtype=np.float64), linenos


def load_sequence(seq_dir: str | Path, name: str | None = None, evaluation: bool = False) -> Sequence:
    """A sequence folder: `groundtruth.txt` and its frames (in `img/` if present, else beside it). `evaluation`:
    the sequence is in an evaluation split, where one box for many frames is a test split's layout (accepted,
    `first_frame_only`); anywhere else a groundtruth.txt shorter than the frame list is refused."""
    seq_dir = Path(seq_dir)
    gt = seq_dir / "groundtruth.txt"
    boxes, lines = _parse_groundtruth(gt)
    frame_dir = seq_dir / "img" if (seq_dir / "img").is_dir() else seq_dir
    files = image_files(frame_dir, recursive=False)
    numbered = {int(p.stem): p for p in files if p.stem.isdigit()}
    n = len(boxes)
    if numbered and len(numbered) == len(files):  # numbered frames: frame i is <i> (1-based)
        for i in range(1, n + 1):
            if i not in numbered:
                suffix = files[0].suffix
                raise MimlabError(f"{seq_dir}: missing frame {frame_dir / f'{i:08d}{suffix}'} "
                                  f"(groundtruth.txt has {n} lines)")
        ordered = [numbered[i] for i in sorted(numbered)]
    else:
        if len(files) < n:
            raise MimlabError(f"{seq_dir}: {len(files)} frames but groundtruth.txt has {n} lines (missing frames)")
        ordered = files
    first_only = n < len(ordered)
    if first_only and not (evaluation and n == 1):
        raise MimlabError(f"{gt}: {n} boxes for {len(ordered)} frames; a groundtruth.txt shorter than its frame list "
                          "is accepted only as a test split's first-frame-only layout (one box, in the evaluation "
                          "split)")
    frames = ordered if first_only else ordered[:n]
    _check_on_frame(boxes, lines, frames, gt)
    return Sequence(name=name or seq_dir.name, frames=frames, boxes=boxes, groundtruth=gt, lines=lines,
                    first_frame_only=first_only)


def _frame_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the image header; None if unreadable (reported when the frame is read)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception:
        return None


def _check_on_frame(boxes: np.ndarray, lines: list[int], frames: list[Path], gt: Path) -> None:
    """Refuse a valid box (finite, positive size) that does not intersect its frame (the first frame's size)."""
    size = _frame_size(frames[0]) if frames else None
    if size is None:
        return
    w, h = size
    valid = np.isfinite(boxes).all(1) & (boxes[:, 2] > 0) & (boxes[:, 3] > 0)
    with np.errstate(invalid="ignore", over="ignore"):
        off = valid & ((boxes[:, 0] + boxes[:, 2] <= 0) | (boxes[:, 1] + boxes[:, 3] <= 0) | (boxes[:, 0] >= w)
                       | (boxes[:, 1] >= h))
    if off.any():
        i = int(np.flatnonzero(off)[0])
        box = ",".join(f"{float(v):g}" for v in boxes[i])
        more = f" ({int(off.sum()) - 1} more such boxes)" if off.sum() > 1 else ""
        raise MimlabError(f"{gt}:{lines[i]}: the box {box} of frame {frames[i].name} does not intersect the "
                          f"{w}x{h} frame{more}")


def _sequence_dirs(root: Path) -> list[Path]:
    list_file = root / "list.txt"
    if list_file.is_file():
        names = [s.strip() for s in read_text(list_file, "sequence list").splitlines() if s.strip()]
        dirs = [root / s for s in names]
        missing = [d for d in dirs if not d.is_dir()]
        if missing:
            raise MimlabError(f"{list_file}: sequence folder not found: {missing[0]}")
        return dirs
    return sorted(p.parent for p in root.rglob("groundtruth.txt"))


def load_sequences(root: str | Path, names: set[str] | None = None, evaluation: bool = False) -> list[Sequence]:
    root = Path(root)
    dirs = _sequence_dirs(root)
    if names is not None:
        dirs = [d for d in dirs if d.name in names]
    if not dirs:
        raise MimlabError(f"{root}: no sequences (folders with groundtruth.txt)")
    return [load_sequence(d, evaluation=evaluation) for d in dirs]


def check_eval_sequences(seqs: list[Sequence]) -> list[Sequence]:
    """One-pass evaluation starts from the first frame's box: it must be a valid box (before any training); at
    least one sequence must have ground truth beyond its first frame to be scored."""
    if seqs and all(s.first_frame_only for s in seqs):
        raise MimlabError(f"{seqs[0].groundtruth}: every evaluation sequence has only its first frame's box (a test "
                          "split whose ground truth is withheld, e.g. GOT-10k test): nothing can be scored; "
                          "evaluate on a split with full ground truth (val/)")
    for s in seqs:
        if not s.valid[0]:
            where = f"{s.groundtruth}:1" if s.groundtruth is not None else f"sequence {s.name}"
            raise MimlabError(f"{where}: the first frame's box {s.boxes[0].tolist()} of evaluation sequence {s.name} "
                              "is not a valid box (NaN or non-positive size); one-pass evaluation starts from it")
    return seqs


def _named(all_dirs: list[Path], names: set[str], list_file: Path, evaluation: bool = False) -> list[Sequence]:
    """The sequences of `all_dirs` named in `list_file`; a name with no sequence folder is an error."""
    found = {d.name for d in all_dirs}
    missing = sorted(names - found)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise MimlabError(f"{list_file}: names {len(missing)} sequence(s) with no folder holding a groundtruth.txt: "
                          f"{', '.join(missing[:3])}{more}")
    return [load_sequence(d, evaluation=evaluation) for d in all_dirs if d.name in names]


def find_tracking_splits(data: str | Path) -> tuple[list[Sequence], list[Sequence]]:
    """Training and evaluation sequences from a GOT-10k or LaSOT tree (see the module docstring)."""
    data = Path(data)
    if not data.is_dir():
        raise ConfigError("data", f"{data}: not a directory")
    if (data / "train").is_dir():
        val = next((data / n for n in ("val", "test") if (data / n).is_dir()), None)
        if val is None:
            raise ConfigError("data", f"{data}: has train/ but no val/ or test/ folder")
        return load_sequences(data / "train"), check_eval_sequences(load_sequences(val, evaluation=True))
    if (data / "testing_set.txt").is_file():
        test_names = {s.strip() for s in read_text(data / "testing_set.txt", "sequence list").splitlines()
                      if s.strip()}
        all_dirs = sorted(p.parent for p in data.rglob("groundtruth.txt"))
        if (data / "training_set.txt").is_file():
            train_names = {s.strip() for s in read_text(data / "training_set.txt", "sequence list").splitlines()
                           if s.strip()}
            train = _named(all_dirs, train_names, data / "training_set.txt")
        else:
            train_names = {d.name for d in all_dirs} - test_names
            train = [load_sequence(d) for d in all_dirs if d.name in train_names]
        test = check_eval_sequences(_named(all_dirs, test_names, data / "testing_set.txt", evaluation=True))
        if not train or not test:
            raise ConfigError("data", f"{data}: testing_set.txt leaves {len(train)} training and {len(test)} "
                                      "test sequences; need at least one of each")
        return train, test
    raise ConfigError("data", f"{data}: expected GOT-10k style train/ and val/ folders, or a LaSOT tree with "
                              "testing_set.txt")
