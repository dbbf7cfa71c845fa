"""COCO keypoint annotations (person_keypoints_*.json): validated loading, split discovery, flip pairs, sigmas.

Keypoints are `[x1, y1, v1, ..., xK, yK, vK]` in COCO's pixel-index convention; v=0 not labelled, 1 labelled but
not visible, 2 visible. Boxes are `[x, y, w, h]`. Every problem is reported with the file and the annotation id.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mimlab.errors import ConfigError, MimlabError, plain

# COCO's per-keypoint OKS sigmas (Ronchi & Perona 2017; cocoapi), by keypoint name.
COCO_SIGMAS = {"nose": 0.026, "left_eye": 0.025, "right_eye": 0.025, "left_ear": 0.035, "right_ear": 0.035,
               "left_shoulder": 0.079, "right_shoulder": 0.079, "left_elbow": 0.072, "right_elbow": 0.072,
               "left_wrist": 0.062, "right_wrist": 0.062, "left_hip": 0.107, "right_hip": 0.107,
               "left_knee": 0.087, "right_knee": 0.087, "left_ankle": 0.089, "right_ankle": 0.089}
DEFAULT_SIGMA = float(np.mean([COCO_SIGMAS[k] for k in COCO_SIGMAS]))  # ~0.0669, for names COCO lacks
# a labelled keypoint may lie outside its image by at most this fraction of the image's width (x) or height (y)
OUTSIDE_MARGIN = 0.1


@dataclass
class Instance:
    ann_id: int
    image_id: int
    bbox: np.ndarray  # (4,) x, y, w, h
    keypoints: np.ndarray  # (K, 3) x, y, v
    area: float


@dataclass
class KeypointSet:
    ann_file: Path
    image_root: Path
    images: dict[int, dict]  # id -> {"file_name", "path", "width", "height"}
    instances: list[Instance]  # non-crowd annotations with at least one labelled keypoint
    names: list[str]
    skeleton: list[list[int]]
    category_id: int
    coco: dict = field(repr=False)  # the validated JSON (for pycocotools)

    @property
    def num_keypoints(self) -> int:
        return len(self.names)


def _num(v, what: str, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise MimlabError(f"{where}: {what} must be a finite number (got {v!r})")
    return float(v)


def _id(v, what: str, where: str):
    """COCO ids are integers (strings are tolerated); anything else (lists, floats, null) is refused."""
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise MimlabError(f"{where}: {what} must be an integer (got {v!r})")
    return v


def _image_size(im: dict, check_images: bool) -> tuple[float, float] | None:
    """(width, height) of an image entry: from the JSON, else from the file's header; None if neither is known."""
    w, h = im.get("width"), im.get("height")
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in (w, h)):
        return float(w), float(h)
    if not (check_images and im["path"].is_file()):
        return None
    from PIL import Image

    try:
        with Image.open(im["path"]) as f:
            return float(f.size[0]), float(f.size[1])
    except Exception:       # unreadable: reported with the file's name when the image is read
        return None


def _check_inside(kps: np.ndarray, names: list[str], size: tuple[float, float] | None, where: str) -> None:
    """Refuse a labelled keypoint (v > 0) outside its image by more than OUTSIDE_MARGIN of the image's size."""
    if size is None:
        return
    w, h = size
    mx, my = OUTSIDE_MARGIN * w, OUTSIDE_MARGIN * h
    for j, (x, y, v) in enumerate(kps):
        if v > 0 and not (-mx <= x <= w - 1 + mx and -my <= y <= h - 1 + my):
            raise MimlabError(f"{where}: keypoint {j} ({names[j]}) at ({x:g}, {y:g}) is marked labelled (v={v:g}) "
                              f"but lies outside its {w:g}x{h:g} image by more than {OUTSIDE_MARGIN:.0%} of its size "
                              f"(x in [{-mx:g}, {w - 1 + mx:g}], y in [{-my:g}, {h - 1 + my:g}])")


def load_coco_keypoints(ann_file: str | Path, image_root: str | Path, check_images: bool = True) -> KeypointSet:
    """Load and validate a COCO keypoint JSON; images are `image_root/<file_name>`."""
    ann_file, image_root = Path(ann_file), Path(image_root)
    if not ann_file.is_file():
        raise MimlabError(f"keypoint annotation file not found: {ann_file}")
    try:
        coco = json.loads(ann_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MimlabError(f"{ann_file}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError as e:
        raise MimlabError(f"{ann_file}: not a UTF-8 text file ({e.reason})") from None
    if not isinstance(coco, dict):
        raise MimlabError(f"{ann_file}: top level must be a JSON object with images, annotations, categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise MimlabError(f"{ann_file}: missing or non-list '{key}'")
    cats = [c for c in coco["categories"] if isinstance(c, dict) and c.get("keypoints")]
    if not cats:
        raise MimlabError(f"{ann_file}: no category has a non-empty 'keypoints' list of names")
    for c in cats:
        kn = c["keypoints"]
        if not isinstance(kn, list) or not all(isinstance(n, str) and n for n in kn):
            raise MimlabError(f"{ann_file}: category '{c.get('name')}': 'keypoints' must be a list of keypoint "
                              f"names (strings), got {kn!r:.80}")
        if len(set(kn)) != len(kn):
            raise MimlabError(f"{ann_file}: category '{c.get('name')}': duplicate keypoint names in {kn}")
    if len({len(c["keypoints"]) for c in cats}) > 1:
        raise MimlabError(f"{ann_file}: keypoint categories have different keypoint counts; use one category")
    cat = cats[0]
    if "id" not in cat:
        raise MimlabError(f"{ann_file}: category '{cat.get('name')}' has no 'id'")
    cat_ids = {_id(c.get("id"), "category id", f"{ann_file}: category '{c.get('name')}'") for c in cats}
    names = [str(n) for n in cat["keypoints"]]
    k = len(names)
    skeleton = cat.get("skeleton") or []

    images: dict[int, dict] = {}
    for i, im in enumerate(coco["images"]):
        where = f"{ann_file}: images[{i}]"
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            raise MimlabError(f"{where}: needs 'id' and 'file_name'")
        _id(im["id"], "'id'", where)
        if not isinstance(im["file_name"], str) or not im["file_name"]:
            raise MimlabError(f"{where}: 'file_name' must be a non-empty string (got {im['file_name']!r})")
        if im["id"] in images:
            raise MimlabError(f"{where}: duplicate image id {im['id']}")
        images[im["id"]] = {"file_name": im["file_name"], "path": image_root / im["file_name"],
                            "width": im.get("width"), "height": im.get("height")}

    instances: list[Instance] = []
    used: set[int] = set()
    ann_ids: set = set()
    sizes: dict = {}                  # image id -> (width, height), read once
    for i, ann in enumerate(coco["annotations"]):
        if not isinstance(ann, dict):
            raise MimlabError(f"{ann_file}: annotations[{i}] is not an object")
        if "category_id" not in ann:
            raise MimlabError(f"{ann_file}: annotation id {ann.get('id', f'#{i}')}: missing 'category_id'")
        if isinstance(ann["category_id"], (list, dict)) or ann["category_id"] not in cat_ids:
            continue
        where = f"{ann_file}: annotation id {ann.get('id', f'#{i}')}"
        for key in ("id", "image_id", "bbox", "keypoints", "area"):
            if key not in ann:
                raise MimlabError(f"{where}: missing '{key}'")
        _id(ann["id"], "'id'", where)
        _id(ann["image_id"], "'image_id'", where)
        if ann["id"] in ann_ids:   # pycocotools indexes annotations by id: a duplicate would be scored twice
            raise MimlabError(f"{where}: duplicate annotation id {ann['id']!r}")
        ann_ids.add(ann["id"])
        if ann["image_id"] not in images:
            raise MimlabError(f"{where}: image_id {ann['image_id']} is not in 'images'")
        bbox = ann["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise MimlabError(f"{where}: malformed bbox {bbox!r} (expected [x, y, w, h])")
        bbox = np.array([_num(v, "bbox value", where) for v in bbox])
        if bbox[2] <= 0 or bbox[3] <= 0:
            raise MimlabError(f"{where}: malformed bbox {ann['bbox']!r} (width and height must be > 0)")
        kps = ann["keypoints"]
        if not isinstance(kps, list) or len(kps) != 3 * k:
            raise MimlabError(f"{where}: 'keypoints' must hold {3 * k} numbers (x, y, v for {k} keypoints), "
                              f"got {len(kps) if isinstance(kps, list) else type(kps).__name__}")
        kps = np.array([_num(v, "keypoint value", where) for v in kps]).reshape(k, 3)
        if not np.isin(kps[:, 2], (0, 1, 2)).all():
            raise MimlabError(f"{where}: keypoint visibility must be 0, 1 or 2 (got {sorted(set(plain(kps[:, 2])))})")
        area = _num(ann["area"], "area", where)
        ann.setdefault("num_keypoints", int((kps[:, 2] > 0).sum()))
        ann.setdefault("iscrowd", 0)
        if ann["iscrowd"] not in (0, 1, True, False):
            raise MimlabError(f"{where}: 'iscrowd' must be 0 or 1 (got {ann['iscrowd']!r})")
        if ann["iscrowd"] or (kps[:, 2] > 0).sum() == 0:
            continue
        if area <= 0:   # OKS divides by the area; COCOeval silently ignores a negative one
            raise MimlabError(f"{where}: 'area' must be > 0 for an annotation with labelled keypoints (got {area:g})")
        if ann["image_id"] not in sizes:
            sizes[ann["image_id"]] = _image_size(images[ann["image_id"]], check_images)
        _check_inside(kps, names, sizes[ann["image_id"]], where)
        instances.append(Instance(ann_id=ann["id"], image_id=ann["image_id"], bbox=bbox, keypoints=kps, area=area))
        used.add(ann["image_id"])
    if check_images:
        missing = [images[i]["path"] for i in sorted(used) if not images[i]["path"].is_file()]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise MimlabError(f"{ann_file}: image file not found: {missing[0]}{more}")
    return KeypointSet(ann_file=ann_file, image_root=image_root, images=images, instances=instances, names=names,
                       skeleton=skeleton, category_id=cat["id"], coco=coco)


def find_coco_splits(data: str | Path) -> dict[str, tuple[Path, Path]]:
    """`DATA/annotations/person_keypoints_<split>.json` + image folder `DATA/<split>` for train and val.

    Matches COCO 2017 (`person_keypoints_train2017.json`, `train2017/`); `val` may also be named `test`.
    """
    data = Path(data)
    ann_dir = data / "annotations"
    if not ann_dir.is_dir():
        raise ConfigError("data", f"{data}: expected {ann_dir}/person_keypoints_<split>.json (COCO layout)")
    out: dict[str, tuple[Path, Path]] = {}
    for split, prefixes in (("train", ("train",)), ("val", ("val", "test"))):
        cands = sorted(p for pre in prefixes for p in ann_dir.glob(f"person_keypoints_{pre}*.json"))
        if not cands:
            raise ConfigError("data", f"{data}: no {ann_dir}/person_keypoints_{prefixes[0]}*.json")
        if len(cands) > 1:
            raise ConfigError("data", f"{data}: several {split} annotation files ({', '.join(p.name for p in cands)})")
        stem = cands[0].stem[len("person_keypoints_"):]
        out[split] = (cands[0], data / stem)
    return out


def flip_pairs(names: list[str]) -> list[tuple[int, int]]:
    """Index pairs (i, j) whose names differ only by left/right (COCO naming: `left_x` <-> `right_x`)."""
    pairs = []
    for i, n in enumerate(names):
        for prefix, other in (("left_", "right_"), ("l_", "r_")):
            if n.startswith(prefix) and other + n[len(prefix):] in names:
                pairs.append((i, names.index(other + n[len(prefix):])))
    return pairs


def parse_flip_pairs(text: str, k: int) -> list[tuple[int, int]]:
    """`1:2,3:4` (0-based indices) -> [(1, 2), (3, 4)]."""
    pairs = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            a, b = (int(v) for v in part.split(":"))
        except ValueError:
            raise ConfigError("flip_pairs", f"'{part}' is not of the form I:J") from None
        if not (0 <= a < k and 0 <= b < k) or a == b:
            raise ConfigError("flip_pairs", f"'{part}' must name two different keypoints in 0..{k - 1}")
        pairs.append((a, b))
    return pairs


def keypoint_sigmas(names: list[str], override: list[float] | None = None) -> np.ndarray:
    """Per-keypoint OKS sigmas: `override` if given, else COCO's value by name, else the COCO mean."""
    if override is not None:
        if len(override) == 1:
            override = override * len(names)
        if len(override) != len(names):
            raise ConfigError("kpt_sigmas", f"got {len(override)} values for {len(names)} keypoints")
        if any(s <= 0 for s in override):
            raise ConfigError("kpt_sigmas", "must be > 0")
        return np.asarray(override, dtype=np.float64)
    return np.array([COCO_SIGMAS.get(n, DEFAULT_SIGMA) for n in names], dtype=np.float64)
