"""Images for the probe: a folder (recursive, sorted by relative path) or a `.npy` array used as is.

`open_rgb` is the one image reader of mimlab (probe, pretraining and the transfer loaders use it): every file is
decoded to 8-bit RGB the same way, and any file it cannot decode correctly is a `MimlabError` naming the file:
- 8-bit modes (L, LA, P, PA, RGBA, CMYK, YCbCr, 1) go through PIL's `convert("RGB")`: grey is replicated to the
  three channels, alpha is dropped (not composited), CMYK uses PIL's conversion (Adobe-inverted JPEGs included);
- 16-bit greyscale (PNG/TIFF `I;16*`, or `I` with values in 0..65535) is scaled to 8 bit, `round(v * 255 / 65535)`
  (PIL's own conversion would clip everything above 255 to white); 16-bit RGB PNGs are read by PIL as 8 bit;
- 32-bit float images (`F`) and 32-bit integer images with values outside 0..65535 have no unambiguous 8-bit
  reading and are refused;
- images of more than `PIL.Image.MAX_IMAGE_PIXELS` pixels (89,478,485 by default) are refused from their header,
  before anything is decoded (decompression-bomb guard);
- truncated, empty or corrupt files are refused (PIL's `LOAD_TRUNCATED_IMAGES` is never set).
EXIF orientation is not applied (as in torchvision and timm).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mimlab.errors import ConfigError, MimlabError

if TYPE_CHECKING:
    from mimlab.data.spec import DataSpec

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


SKIPPED_SHOWN = 5      # paths named in the warning about skipped entries


def image_files(root: Path, recursive: bool = True) -> list[Path]:
    """The image files in `root` (by extension, case-insensitive), sorted by their path relative to `root`: the one
    folder scanner of mimlab (the probe's folders, pretraining's class folders, the transfer ImageFolder splits).

    Entries with an image name that are not files (a broken symbolic link, a socket) are skipped, and said on
    stderr: their count and the first few paths."""
    found = root.rglob("*") if recursive else root.iterdir()
    files, skipped = [], []
    for p in found:
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if p.is_file():
            files.append(p)
        elif not p.is_dir():
            skipped.append(p)
    key = lambda p: p.relative_to(root).as_posix()          # noqa: E731
    if skipped:
        _warn_skipped(root, sorted(skipped, key=key))
    return sorted(files, key=key)


def _warn_skipped(root: Path, skipped: list[Path]) -> None:
    shown = ", ".join(f"{p.relative_to(root).as_posix()} ({'broken symlink' if p.is_symlink() else 'not a file'})"
                      for p in skipped[:SKIPPED_SHOWN])
    more = f", ... (+{len(skipped) - SKIPPED_SHOWN} more)" if len(skipped) > SKIPPED_SHOWN else ""
    print(f"warning: {root}: skipped {len(skipped)} image name(s) that are not readable files: {shown}{more}",
          file=sys.stderr)


def list_images(root: str | Path, param: str = "data") -> list[Path]:
    """All image files under `root`, recursively, sorted by their path relative to `root`."""
    root = Path(root)
    if not root.exists():
        raise ConfigError(param, f"{root}: no such file or directory")
    if not root.is_dir():
        raise ConfigError(param, f"{root}: not a directory or a .npy file")
    files = image_files(root)
    if not files:
        raise ConfigError(param, f"{root}: no images found (looked recursively for {', '.join(IMAGE_EXTENSIONS)})")
    return files


def _decode(im, path: Path):
    """An opened PIL image -> 8-bit RGB PIL image (see the module docstring), or MimlabError."""
    from PIL import Image

    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im)
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 65535):
            raise MimlabError(f"cannot read image {path}: 32-bit integer pixels with values "
                              f"{int(arr.min())}..{int(arr.max())} (outside 0..65535) have no 8-bit reading; "
                              "save it as an 8- or 16-bit image")
        eight = ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(eight).convert("RGB")
    if mode == "F":
        raise MimlabError(f"cannot read image {path}: 32-bit float pixels have no unambiguous 8-bit reading "
                          "(0..1 or 0..255?); save it as an 8- or 16-bit image")
    return im.convert("RGB")


def open_rgb(path: str | Path):
    """Open an image file as an 8-bit RGB PIL image, naming the file when it cannot be read correctly."""
    import warnings

    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise MimlabError(f"cannot read image {path}: " + ("it is a directory" if path.is_dir() else
                                                             "no such file"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # checked below, as an error
            with Image.open(path) as im:
                w, h = im.size
                limit = Image.MAX_IMAGE_PIXELS
                if limit and w * h > limit:
                    raise MimlabError(
                        f"cannot read image {path}: {w}x{h} = {w * h:,} pixels is more than the limit of "
                        f"{limit:,} (PIL.Image.MAX_IMAGE_PIXELS, a decompression-bomb guard); resize the image "
                        "or raise that limit")
                im.load()
                return _decode(im, path)
    except MimlabError:
        raise
    except Image.DecompressionBombError as e:
        raise MimlabError(f"cannot read image {path}: {e}") from None
    except Exception as e:  # PIL's decoders raise many types on corrupt input (OSError, ValueError, SyntaxError...)
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MimlabError(f"cannot read image {path}: {text}") from None


class MultiTransformImages(Dataset):
    """Item i = tuple of `transform(load(items[i]))` for each transform (one per distinct model data config).

    `load` defaults to reading an image file (`items` are paths); pass another loader for in-memory sources."""

    def __init__(self, items: Sequence, transforms: Sequence[Callable], load: Callable | None = None):
        self.items = list(items)
        self.transforms = list(transforms)
        self.load = load or open_rgb

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        img = self.load(self.items[i])
        return tuple(t(img) for t in self.transforms)


# storage address of each array returned by load_npy -> its file, so that errors about an image can name the file
_NPY_SOURCES: dict[int, str] = {}


class RepeatTensor(Dataset):
    """Item i = (x[i],) * k: a pre-normalised array shared by all models. An image with NaN or inf values is an
    error naming the file (when `x` came from `load_npy`) and the image index; only images actually read are
    checked, so a large memory-mapped array is never scanned as a whole."""

    def __init__(self, x: torch.Tensor, k: int):
        self.x, self.k = x, k

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int):
        xi = self.x[i]
        if not bool(torch.isfinite(xi).all()):
            src = _NPY_SOURCES.get(self.x.untyped_storage().data_ptr(), "(the .npy array)")
            raise ConfigError("data", f"{src}: image {i} holds NaN or inf values; the probe needs finite, "
                              "normalised pixels")
        return (xi,) * self.k


def load_npy(path: str | Path) -> torch.Tensor:
    """A float32 array N x 3 x H x W, already normalised, used as is (memory-mapped; `RepeatTensor` checks each
    image it serves for NaN/inf)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("data", f"{path}: no such file")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ConfigError("data", f"{path}: not a readable .npy array ({e})") from None
    if arr.ndim != 4 or arr.shape[1] != 3:
        raise ConfigError("data", f"{path}: expected shape N x 3 x H x W, got {tuple(arr.shape)}")
    if arr.dtype != np.float32:
        raise ConfigError("data", f"{path}: expected float32 (already normalised), got {arr.dtype}")
    if arr.shape[0] == 0:
        raise ConfigError("data", f"{path}: holds no images (shape {tuple(arr.shape)})")
    x = torch.from_numpy(np.ascontiguousarray(arr))   # still memory-mapped: images are read when used
    _NPY_SOURCES[x.untyped_storage().data_ptr()] = str(path)
    return x


# ------------------------------------------------------------------------------ class folders, sources
def scan_class_folders(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """ImageNet layout (sorted class sub-directories, sorted files, searched recursively) or a flat folder."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files: list[Path] = []
    labels: list[int] = []
    names: list[str] = []
    for c in classes:
        found = image_files(root / c)
        if found:
            labels += [len(names)] * len(found)
            names.append(c)
            files += found
    flat = image_files(root, recursive=False)
    if not files:
        files, labels, names = flat, [0] * len(flat), ["."]
    elif flat:
        print(f"warning: {root}: ignoring {len(flat)} images next to the class folders", file=sys.stderr)
    if not files:
        raise ConfigError("data", f"{root}: no images found (expected ROOT/CLASS/*.jpg or a folder of images)")
    return files, labels, names


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

        return pil_to_tensor(open_rgb(self.files[i]))


# ---------------------------------------------------------------------------- normalisation
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


def held_out_images(spec: "DataSpec", size: tuple[int, int], n: int, *, mean: Sequence[float] = IMAGENET_MEAN,
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
        from mimlab.data.builtin import builtin_array

        images, _, _ = builtin_array(p["kind"], classes=classes, per_class=per, size=max(size), seed=p["seed"],
                                     offset=p["per_class"])
        order = np.arange(len(images)).reshape(classes, per).T.reshape(-1)[:n]  # round-robin over classes
        return torch.stack([tf(torch.from_numpy(images[i]).permute(2, 0, 1)) for i in order]).as_subclass(torch.Tensor)
    src = source if source is not None else FileSource(*scan_class_folders(spec.path)[:2])
    idx = np.linspace(0, len(src) - 1, num=min(n, len(src))).round().astype(int)
    out = []
    for i in idx:
        try:
            out.append(tf(src.load(int(i))))
        except MimlabError:
            continue
    if not out:
        raise ConfigError("data", f"{spec.path}: no readable image for the online probe")
    return torch.stack(out).as_subclass(torch.Tensor)
