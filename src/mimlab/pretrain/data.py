"""Pretraining data: the built-in formula-driven images or an ImageFolder tree, augmented per sample seed.

``--data`` accepts

* ``builtin`` or ``builtin:KIND?classes=100&per_class=32&seed=0`` -- `mimlab.data.synthetic.SyntheticImages`
  rendered at the model's input size (KIND one of its KINDS, default its DEFAULT_KIND); the rendered array is
  cached under ``$MIMLAB_CACHE`` (default ``~/.cache/mimlab``) so later runs start at once;
* a directory: an ImageNet-layout tree ``ROOT/CLASS/*.jpg`` (classes = sorted sub-directories holding images,
  files sorted), or a flat folder of images (one class; masked image modeling only).

Augmentation (torchvision transforms v2 functionals on uint8 tensors): RandomResizedCrop (SimMIM: scale 0.67-1,
ratio 3/4-4/3) and horizontal flip per sample; the mean/std normalisation runs batched on the device
(`normalize`). Every random choice of sample ``i`` in epoch ``e`` (crop, flip, SimMIM
mask, MAE noise) is drawn from ``mix_seed(run_seed, e, i)`` (see `mimlab.engine.sampler`), so batches are
identical with any number of workers or processes, and after resuming.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import parse_qsl

import numpy as np
import torch

from mimlab.engine.sampler import SeededDataset
from mimlab.errors import MimlabError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BUILTIN_DEFAULTS: dict[str, Any] = {"classes": 100, "per_class": 32, "seed": 0}
# RandomResizedCrop scale per method: SimMIM official (0.67, 1); MAE official (0.2, 1); DeiT/timm (0.08, 1).
CROP_SCALE = {"simmim": (0.67, 1.0), "mae": (0.2, 1.0), "supervised": (0.08, 1.0)}
BAD_IMAGE_POLICIES = ("fail", "skip")


# ----------------------------------------------------------------------------------------- --data
@dataclass
class DataSpec:
    kind: str                      # "builtin" | "folder"
    path: Path | None = None
    params: dict[str, Any] = field(default_factory=dict)


def parse_data_spec(text: str) -> DataSpec:
    """``builtin[:KIND][?k=v&...]`` or a directory path."""
    from mimlab.data.synthetic import DEFAULT_KIND, KINDS

    if text == "builtin" or text.startswith("builtin:") or text.startswith("builtin?"):
        rest = text[len("builtin"):].lstrip(":")
        kind, _, query = rest.partition("?")
        kind = kind or DEFAULT_KIND
        if kind not in KINDS:
            raise MimlabError(f"--data {text}: unknown built-in kind '{kind}' (choose from {', '.join(KINDS)})")
        params: dict[str, Any] = dict(BUILTIN_DEFAULTS)
        for key, value in parse_qsl(query, keep_blank_values=True):
            if key not in ("classes", "per_class", "seed", "size"):
                raise MimlabError(f"--data {text}: unknown key '{key}' (known: classes, per_class, seed, size)")
            try:
                params[key] = int(value)
            except ValueError:
                raise MimlabError(f"--data {text}: '{key}={value}' is not an integer") from None
        params["kind"] = kind
        return DataSpec("builtin", None, params)
    path = Path(text)
    if not path.exists():
        raise MimlabError(f"--data {text}: no such directory (or use 'builtin')")
    if not path.is_dir():
        raise MimlabError(f"--data {text}: not a directory of images (or use 'builtin')")
    return DataSpec("folder", path, {})


def cache_dir() -> Path:
    return Path(os.environ.get("MIMLAB_CACHE", Path.home() / ".cache" / "mimlab"))


def builtin_array(kind: str, *, classes: int, per_class: int, size: int, seed: int = 0, offset: int = 0,
                  workers: int | None = None, use_cache: bool = True) -> tuple[np.ndarray, np.ndarray, Path | None]:
    """Rendered built-in images ``(N, size, size, 3) uint8``, labels ``(N,)`` and the cache file used."""
    from mimlab.data.synthetic import GENERATOR_VERSION, SyntheticImages
    from mimlab.utils.io import atomic_path

    ds = SyntheticImages(kind, classes=classes, per_class=per_class, size=size, seed=seed, offset=offset)
    name = f"{kind}-c{classes}-n{per_class}-o{offset}-s{size}-seed{seed}-v{GENERATOR_VERSION}.npz"
    path = cache_dir() / "builtin" / name
    if use_cache and path.exists():
        try:
            with np.load(path) as z:
                return z["images"], z["labels"], path
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache file is regenerated
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    images, labels = ds.to_array(workers)
    if use_cache:
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.savez(f, images=images, labels=labels)
        except OSError:
            path = None
    return images, labels, path if use_cache else None


def scan_image_folder(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """ImageNet layout (sorted class sub-directories, sorted files, searched recursively) or a flat folder."""
    from mimlab.data.images import IMAGE_EXTENSIONS

    def images_in(d: Path) -> list[Path]:
        return sorted((p for p in d.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
                      key=lambda p: p.relative_to(d).as_posix())

    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files: list[Path] = []
    labels: list[int] = []
    names: list[str] = []
    for c in classes:
        found = images_in(root / c)
        if found:
            labels += [len(names)] * len(found)
            names.append(c)
            files += found
    flat = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        files, labels, names = flat, [0] * len(flat), ["."]
    elif flat:
        print(f"warning: --data {root}: ignoring {len(flat)} images next to the class folders", file=sys.stderr)
    if not files:
        raise MimlabError(f"--data {root}: no images found (expected ROOT/CLASS/*.jpg or a folder of images)")
    return files, labels, names


# ----------------------------------------------------------------------------------------- sources
class ArraySource:
    """Images held in memory as uint8 (N, H, W, 3)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # (N, 3, H, W) view
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def name(self, i: int) -> str:
        return f"builtin image {i}"

    def load(self, i: int) -> Any:
        return self.images[i]


class FileSource:
    """Image files read with PIL (RGB); unreadable files raise MimlabError naming the path."""

    def __init__(self, files: Sequence[Path], labels: Sequence[int]):
        self.files = list(files)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.files)

    def name(self, i: int) -> str:
        return str(self.files[i])

    def load(self, i: int) -> Any:
        from torchvision.transforms.v2.functional import pil_to_tensor

        from mimlab.data.images import open_rgb

        return pil_to_tensor(open_rgb(self.files[i]))


def random_resized_crop_params(rng: np.random.Generator, height: int, width: int, scale: tuple[float, float],
                               ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(top, left, h, w) of an Inception-style random resized crop (Szegedy et al. 2015; torchvision's rule).

    Up to 10 tries: area fraction ~ U(scale), log aspect ratio (w/h) ~ U(log ratio), ``w = round(sqrt(A * r))``,
    ``h = round(sqrt(A / r))``; the first crop that fits is placed uniformly. Otherwise a centred crop of the
    whole image with its aspect ratio clamped to `ratio`.
    """
    area = height * width
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(lo, hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class Augment:
    """RandomResizedCrop + horizontal flip on a uint8 (3, H, W) tensor, drawn from a numpy generator.

    Applied with torchvision.transforms.v2.functional (antialiased bilinear resize); the output stays uint8 --
    `normalize` turns batches into float on the device, which keeps workers and host-to-device copies cheap.
    """

    size: tuple[int, int]
    scale: tuple[float, float]
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True

    def __call__(self, img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        top, left, h, w = random_resized_crop_params(rng, img.shape[-2], img.shape[-1], self.scale, self.ratio)
        out = F.resized_crop(img, top, left, h, w, list(self.size), antialias=True)
        if self.hflip and rng.random() < 0.5:
            out = F.horizontal_flip(out)
        return out


def normalize(images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 ``(x / 255 - mean) / std`` on the tensor's device."""
    m = torch.tensor(mean, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.float() / 255.0 - m) / s


def build_eval_transform(size: tuple[int, int], mean: Sequence[float] = IMAGENET_MEAN,
                         std: Sequence[float] = IMAGENET_STD) -> Callable:
    from torchvision.transforms import v2

    return v2.Compose([v2.ToImage(), v2.Resize(min(size), antialias=True), v2.CenterCrop(size),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


# ----------------------------------------------------------------------------------------- dataset
class PretrainDataset(SeededDataset):
    """Item = dict(image uint8 (3, H, W), label, [mask (gh, gw) uint8 | noise (L,) float32], _skipped).

    Everything random comes from ``numpy.random.Generator(PCG64(seed))`` in a fixed order: crop, flip, then the
    SimMIM mask (``mask_fn(rng)``, target ``"simmim"``) or the MAE noise (`num_tokens` uniforms, ``"mae"``).
    Unreadable images: ``bad_images="fail"`` raises naming the file; ``"skip"`` uses the next readable image
    (counted in ``_skipped``). Normalise batches with `normalize`.
    """

    def __init__(self, source: ArraySource | FileSource, augment: Augment, *, target: str,
                 mask_fn: Callable[[np.random.Generator], np.ndarray] | None = None, num_tokens: int = 0,
                 bad_images: str = "fail"):
        if bad_images not in BAD_IMAGE_POLICIES:
            raise MimlabError(f"--bad-images must be one of {', '.join(BAD_IMAGE_POLICIES)}, got '{bad_images}'")
        if target == "simmim" and mask_fn is None:
            raise ValueError("simmim target needs mask_fn")
        self.source = source
        self.augment = augment
        self.target = target
        self.mask_fn = mask_fn
        self.num_tokens = num_tokens
        self.bad_images = bad_images
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.source)

    def _load(self, index: int) -> tuple[Any, int, int]:
        n = len(self.source)
        for tries in range(n):
            i = (index + tries) % n
            try:
                return self.source.load(i), int(self.source.labels[i]), tries
            except MimlabError as e:
                if self.bad_images == "fail":
                    raise MimlabError(f"{e} (pass --bad-images skip to skip unreadable files)") from None
                if i not in self._warned:
                    self._warned.add(i)
                    print(f"warning: skipping unreadable image: {e}", file=sys.stderr)
        raise MimlabError("no readable image in the dataset")

    def get(self, index: int, seed: int) -> dict[str, Any]:
        img, label, skipped = self._load(index)
        rng = np.random.Generator(np.random.PCG64(seed))
        item: dict[str, Any] = {"image": self.augment(img, rng), "label": label, "_skipped": skipped}
        if self.target == "simmim":
            item["mask"] = torch.from_numpy(self.mask_fn(rng))
        elif self.target == "mae":
            item["noise"] = torch.from_numpy(rng.random(self.num_tokens, dtype=np.float32))
        return item


def held_out_images(spec: DataSpec, size: tuple[int, int], n: int, *, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD, source: FileSource | None = None) -> torch.Tensor:
    """A fixed, normalised (n, 3, H, W) set for the online probe.

    Built-in data: images of the same classes with indices past the training ones (never seen in training).
    A folder: n files spread evenly over the (sorted) dataset, resized and centre-cropped (these are training
    images; pass a separate folder with --probe-data for a held-out set).
    """
    tf = build_eval_transform(size, mean, std)
    if spec.kind == "builtin":
        p = spec.params
        classes = p["classes"]
        per = max(1, math.ceil(n / classes))
        images, _, _ = builtin_array(p["kind"], classes=classes, per_class=per, size=max(size), seed=p["seed"],
                                     offset=p["per_class"])
        order = np.arange(len(images)).reshape(classes, per).T.reshape(-1)[:n]  # round-robin over classes
        return torch.stack([tf(torch.from_numpy(images[i]).permute(2, 0, 1)) for i in order]).as_subclass(torch.Tensor)
    src = source if source is not None else FileSource(*scan_image_folder(spec.path)[:2])
    idx = np.linspace(0, len(src) - 1, num=min(n, len(src))).round().astype(int)
    out = []
    for i in idx:
        try:
            out.append(tf(src.load(int(i))))
        except MimlabError:
            continue
    if not out:
        raise MimlabError(f"--data {spec.path}: no readable image for the online probe")
    return torch.stack(out).as_subclass(torch.Tensor)
