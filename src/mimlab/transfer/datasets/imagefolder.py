"""ImageFolder classification data: `ROOT/{train,val}/<class>/<image>`; classes are sorted directory names."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mimlab.errors import ConfigError, MimlabError
from mimlab.data.images import IMAGE_EXTENSIONS, image_files


@dataclass
class ImageFolderSplit:
    root: Path
    classes: list[str]
    samples: list[tuple[Path, int]]

    @property
    def labels(self) -> list[int]:
        return [y for _, y in self.samples]


def scan_split(root: str | Path, classes: list[str] | None = None) -> ImageFolderSplit:
    """List `root/<class>/*` images. With `classes`, the split must have exactly those class folders."""
    root = Path(root)
    if not root.is_dir():
        raise MimlabError(f"ImageFolder split not found: {root} (expected {root}/<class>/<image files>)")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise MimlabError(f"{root}: no class folders (expected {root}/<class>/<image files>)")
    if classes is not None and found != classes:
        missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
        raise MimlabError(f"{root}: class folders differ from the training split's "
                          f"(missing: {missing or 'none'}, extra: {extra or 'none'})")
    samples: list[tuple[Path, int]] = []
    for label, name in enumerate(found):
        files = image_files(root / name, recursive=False)
        if not files:
            raise MimlabError(f"{root / name}: class folder has no image files ({', '.join(IMAGE_EXTENSIONS)})")
        samples += [(p, label) for p in files]
    return ImageFolderSplit(root=root, classes=found, samples=samples)


def find_imagefolder(data: str | Path) -> tuple[ImageFolderSplit, ImageFolderSplit]:
    """`DATA/train` and `DATA/val` (or `DATA/test`) with the same class folders."""
    data = Path(data)
    if not data.is_dir():
        raise ConfigError("data", f"{data}: not a directory")
    val_dir = next((data / n for n in ("val", "validation", "test") if (data / n).is_dir()), None)
    if not (data / "train").is_dir() or val_dir is None:
        raise ConfigError("data", f"{data}: expected ImageFolder splits {data}/train/<class>/ and {data}/val/<class>/")
    train = scan_split(data / "train")
    return train, scan_split(val_dir, classes=train.classes)
