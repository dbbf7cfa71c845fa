"""Monocular depth estimation on NYUv2- or KITTI-style split files: deconvolution head, SILog loss, the eight
standard metrics on valid pixels (see `metrics/depth.py`, `losses.silog_loss`, `datasets/depth.py`).

Training resizes the RGB image (bilinear) and the depth map (nearest, so invalid zeros stay zeros) to the
backbone's input size, with random horizontal flips. Evaluation upsamples the prediction (bilinear) to each ground
truth's own resolution and scores the pixels with min_depth < gt < max_depth inside the evaluation crop.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mimlab.engine import SeededDataset
from mimlab.errors import ConfigError, MimlabError
from mimlab.transfer.backbone import Backbone
from mimlab.transfer.datasets.common import load_depth_png, load_rgb
from mimlab.transfer.datasets.depth import FORMATS, DepthSample, crop_mask, find_depth_splits, read_split_file
from mimlab.transfer.geometry import resize, to_tensor
from mimlab.transfer.heads import DepthHead
from mimlab.transfer.losses import silog_loss
from mimlab.transfer.metrics.depth import DepthMeter, valid_mask
from mimlab.transfer.tasks.base import TaskRun, TransferModel
from mimlab.transfer.tasks.options import DEPTH as DEPTH_OPTIONS

OPTIONS = DEPTH_OPTIONS


class DepthModel(TransferModel):
    def __init__(self, backbone: Backbone, max_depth: float, num_deconv: int, channels: int, frozen: bool):
        super().__init__(backbone, DepthHead(backbone.embed_dim, max_depth, num_deconv, channels), frozen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.run_backbone(self.backbone.features_map, x), size=tuple(x.shape[-2:]))


class DepthDataset(SeededDataset):
    def __init__(self, samples: list[DepthSample], size: tuple[int, int], mean, std, scale: float, train: bool):
        self.samples, self.size, self.mean, self.std, self.scale, self.train = samples, size, mean, std, scale, train

    def __len__(self) -> int:
        return len(self.samples)

    def get(self, index: int, seed: int) -> dict[str, torch.Tensor]:
        s = self.samples[index]
        img = load_rgb(s.rgb)
        depth = load_depth_png(s.depth, self.scale)
        if img.shape[:2] != depth.shape:
            raise MimlabError(f"{s.depth}: depth map is {depth.shape[1]}x{depth.shape[0]} but image {s.rgb} is "
                              f"{img.shape[1]}x{img.shape[0]}")
        img, depth = resize(img, self.size), resize(depth, self.size, nearest=True)
        if self.train and np.random.default_rng(seed).random() < 0.5:
            img, depth = img[:, ::-1], depth[:, ::-1]
        return {"image": to_tensor(img, self.mean, self.std),
                "depth": torch.from_numpy(np.array(depth, dtype=np.float32, copy=True))[None]}


def build(data: str, backbone: Backbone, opts: dict[str, Any], mode: str, eval_batch_size: int) -> TaskRun:
    fmt = opts["depth_format"]
    if fmt not in FORMATS:
        raise ConfigError("depth_format", f"must be one of {', '.join(FORMATS)}, got '{fmt}'")
    scale = opts["depth_scale"] or FORMATS[fmt]["scale"]
    max_depth = opts["max_depth"] or FORMATS[fmt]["max_depth"]
    min_depth = opts["min_depth"]
    crop = opts["eval_crop"] or ("nyu_eigen" if fmt == "nyu" else "garg")
    crop_mask((4, 4), crop)  # validates the name
    if not 0 <= min_depth < max_depth:
        raise ConfigError("min_depth", f"{min_depth} / max_depth {max_depth}: need 0 <= min < max")
    train_file, val_file = find_depth_splits(data, opts["train_split"] or None, opts["val_split"] or None)
    train_s, val_s = read_split_file(train_file, data), read_split_file(val_file, data)
    ih, iw = backbone.info.img_size
    size = (iw, ih)
    mean, std = backbone.info.mean, backbone.info.std
    train_ds = DepthDataset(train_s, size, mean, std, scale, True)
    val_ds = DepthDataset(val_s, size, mean, std, scale, False)
    model = DepthModel(backbone, max_depth, opts["num_deconv"], opts["head_channels"], frozen=mode == "linear")
    lam = opts["silog_lambda"]

    def loss_fn(net, batch):
        gt = batch["depth"]
        mask = (gt > min_depth) & (gt < max_depth)
        return silog_loss(net(batch["image"]).float().clamp_min(min_depth), gt, mask, lam=lam)

    def evaluate(m: DepthModel, device: torch.device) -> dict[str, float]:
        meter = DepthMeter()
        m.eval()
        with torch.no_grad():
            for start in range(0, len(val_s), eval_batch_size):
                idx = range(start, min(start + eval_batch_size, len(val_s)))
                pred = m(torch.stack([val_ds[i]["image"] for i in idx]).to(device)).float()
                for j, i in enumerate(idx):
                    gt = load_depth_png(val_s[i].depth, scale)
                    p = F.interpolate(pred[j:j + 1], size=gt.shape, mode="bilinear", align_corners=False)[0, 0]
                    mask = valid_mask(gt, min_depth, max_depth, crop_mask(gt.shape, crop))
                    meter.update(p.cpu().numpy(), gt, mask, min_depth=min_depth, max_depth=max_depth)
        return meter.result()

    def baseline() -> dict[str, float]:
        total, count = 0.0, 0
        for s in train_s:
            gt = _depth_of(s, scale)
            v = gt[valid_mask(gt, min_depth, max_depth)]
            total, count = total + float(v.astype(np.float64).sum()), count + v.size
        if count == 0:
            raise MimlabError(f"{train_file}: no valid depth pixel in the training split")
        mean_depth = total / count
        meter = DepthMeter()
        for s in val_s:
            gt = _depth_of(s, scale)
            meter.update(np.full(gt.shape, mean_depth), gt, valid_mask(gt, min_depth, max_depth,
                                                                         crop_mask(gt.shape, crop)),
                         min_depth=min_depth, max_depth=max_depth)
        if not meter.rows:
            raise MimlabError(f"{val_file}: no evaluation image has a valid depth pixel ({min_depth:g} < depth < "
                              f"{max_depth:g} m inside the {crop} crop): nothing can be scored")
        # evaluation images without a single valid ground-truth pixel (after the crop) are not scored: the
        # baseline sees the same masks as every evaluation, so its count goes into the data info
        info["num_val_without_valid_depth"] = meter.skipped
        return {**meter.result(), "mean_depth_m": mean_depth}

    info = {"format": fmt, "depth_scale": scale, "min_depth": min_depth, "max_depth": max_depth, "eval_crop": crop,
            "train_split": str(train_file), "val_split": str(val_file), "num_train": len(train_s),
            "num_val": len(val_s), "input_size": [ih, iw]}
    # the trivial baseline reads every depth map of both splits (and each image's header): an unreadable file, a
    # map of another size than its image, or a split without a valid pixel fails here, before any training
    base = baseline()
    return TaskRun(model=model, train_set=train_ds, loss_fn=loss_fn, evaluate=evaluate, baseline=lambda: base,
                   data_info=info)


def _depth_of(s: DepthSample, scale: float) -> np.ndarray:
    """A sample's depth map in metres, refused when its size differs from its image's (read from the header)."""
    gt = load_depth_png(s.depth, scale)
    size = _header_size(s.rgb)
    if size is not None and size != (gt.shape[1], gt.shape[0]):
        raise MimlabError(f"{s.depth}: depth map is {gt.shape[1]}x{gt.shape[0]} but image {s.rgb} is "
                          f"{size[0]}x{size[1]}")
    return gt


def _header_size(path) -> tuple[int, int] | None:
    """(width, height) of an image from its header; an unreadable one is reported by the one image reader."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception:
        load_rgb(path)          # raises the reader's one-line error naming the file
        return None
