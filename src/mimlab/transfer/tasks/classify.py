"""Image classification on an ImageFolder tree: linear probe or fine-tuning; top-1 and mean per-class accuracy."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mimlab.engine import SeededDataset
from mimlab.errors import ConfigError
from mimlab.transfer.backbone import Backbone
from mimlab.transfer.datasets.common import load_rgb
from mimlab.transfer.datasets.imagefolder import ImageFolderSplit, find_imagefolder
from mimlab.transfer.geometry import crop_matrix, warp, to_tensor
from mimlab.transfer.heads import LinearHead
from mimlab.transfer.metrics.classification import classification_metrics, majority_baseline
from mimlab.transfer.tasks.base import TaskRun, TransferModel
from mimlab.transfer.tasks.options import CLASSIFY as CLASSIFY_OPTIONS, area_range

OPTIONS = CLASSIFY_OPTIONS


class ClassifyModel(TransferModel):
    def __init__(self, backbone: Backbone, num_classes: int, pool: str, frozen: bool):
        super().__init__(backbone, LinearHead(backbone.embed_dim, num_classes, batchnorm=frozen), frozen)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.run_backbone(self.backbone.pooled, x, self.pool))


def _center_view(img: np.ndarray, out: tuple[int, int]) -> np.ndarray:
    """The largest centred crop of the output aspect ratio, resized to `out` = (w, h)."""
    h, w = img.shape[:2]
    ar = out[0] / out[1]
    cw, ch = (h * ar, h) if w / h > ar else (w, w / ar)
    return warp(img, crop_matrix((w / 2, h / 2), (cw, ch), out), out)


class ClassifyDataset(SeededDataset):
    def __init__(self, split: ImageFolderSplit, size: tuple[int, int], mean, std, train: bool,
                 crop_scale: tuple[float, float], hflip: bool):
        self.split, self.size, self.mean, self.std = split, size, mean, std
        self.train, self.crop_scale, self.hflip = train, crop_scale, hflip

    def __len__(self) -> int:
        return len(self.split.samples)

    def get(self, index: int, seed: int) -> tuple[torch.Tensor, int]:
        path, label = self.split.samples[index]
        img = load_rgb(path)
        if not self.train:
            return to_tensor(_center_view(img, self.size), self.mean, self.std), label
        rng = np.random.default_rng(seed)
        h, w = img.shape[:2]
        area = rng.uniform(*self.crop_scale) * h * w
        ar = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = min(w, np.sqrt(area * ar)), min(h, np.sqrt(area / ar))
        cx, cy = rng.uniform(cw / 2, w - cw / 2), rng.uniform(ch / 2, h - ch / 2)
        m = crop_matrix((cx, cy), (cw, ch), self.size, flip=self.hflip and rng.random() < 0.5)
        return to_tensor(warp(img, m, self.size), self.mean, self.std), label


def build(data: str, backbone: Backbone, opts: dict[str, Any], mode: str, eval_batch_size: int) -> TaskRun:
    if opts["pool"] not in ("mean", "cls"):
        raise ConfigError("pool", f"must be 'mean' or 'cls', got '{opts['pool']}'")
    crop_scale = area_range(opts["crop_scale"])
    train_split, val_split = find_imagefolder(data)
    n_cls = len(train_split.classes)
    if n_cls < 2:
        raise ConfigError("data", f"{data}: need at least 2 classes, found {n_cls}")
    size = (backbone.info.img_size[1], backbone.info.img_size[0])
    mean, std = backbone.info.mean, backbone.info.std
    train_set = ClassifyDataset(train_split, size, mean, std, True, crop_scale, bool(opts["hflip"]))
    val_set = ClassifyDataset(val_split, size, mean, std, False, 1.0, False)
    model = ClassifyModel(backbone, n_cls, opts["pool"], frozen=mode == "linear")
    smoothing = opts["label_smoothing"]

    def loss_fn(net, batch):
        x, y = batch
        logits = net(x)
        loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
        return loss, {"acc": (logits.argmax(1) == y).float().mean()}

    def evaluate(m: ClassifyModel, device: torch.device) -> dict[str, float]:
        preds = []
        m.eval()
        with torch.no_grad():
            for start in range(0, len(val_set), eval_batch_size):
                xs = torch.stack([val_set[i][0] for i in range(start, min(start + eval_batch_size, len(val_set)))])
                preds.append(m(xs.to(device)).argmax(1).cpu())
        return classification_metrics(torch.cat(preds).numpy(), np.array(val_split.labels), n_cls)

    def baseline() -> dict[str, float]:
        return majority_baseline(np.array(train_split.labels), np.array(val_split.labels), n_cls)

    info = {"format": "imagefolder", "classes": train_split.classes, "num_train": len(train_split.samples),
            "num_val": len(val_split.samples), "val_dir": str(val_split.root), "input_size": list(size[::-1])}
    return TaskRun(model=model, train_set=train_set, loss_fn=loss_fn, evaluate=evaluate, baseline=baseline,
                   data_info=info)
