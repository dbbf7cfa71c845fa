"""Top-down keypoint estimation on COCO keypoint JSON: heatmap head, Gaussian targets, flip test, OKS AP.

Pipeline (SimpleBaseline, Xiao et al. 2018; ViTPose, Xu et al. 2022), with ground-truth boxes at evaluation:
- crop: the box, widened to the input aspect ratio and scaled by `box_scale` (1.25), warped to the backbone's
  input size; training adds a random scale (1 +- scale_jitter), rotation (|r| <= rotation deg, p = 0.6) and a
  horizontal flip (p = 0.5, left/right keypoints swapped);
- target: per keypoint a Gaussian exp(-|q - k|^2 / (2 sigma^2)) on the heatmap grid (sigma in heatmap pixels),
  weight 0 for unlabelled keypoints or keypoints outside the crop; loss = weighted MSE;
- decoding: argmax, then a quarter-pixel shift towards the higher neighbour; the score of a keypoint is its
  heatmap maximum and the instance score the mean of those; flip test averages the heatmaps of the crop and of its
  mirror (mirrored back, left/right channels swapped).
Keypoints are read and written in COCO's pixel-index convention (continuous coordinate = index + 0.5 internally).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from mimlab.engine import SeededDataset
from mimlab.errors import ConfigError, MimlabError
from mimlab.transfer.backbone import Backbone
from mimlab.transfer.datasets.coco_keypoints import (Instance, KeypointSet, find_coco_splits, flip_pairs,
                                                     keypoint_sigmas, load_coco_keypoints, parse_flip_pairs)
from mimlab.transfer.datasets.common import load_rgb
from mimlab.transfer.geometry import apply, crop_matrix, to_tensor, warp
from mimlab.transfer.heads import HeatmapHead
from mimlab.transfer.losses import heatmap_mse
from mimlab.transfer.metrics.keypoints import coco_keypoint_ap
from mimlab.transfer.tasks.base import TaskRun, TransferModel
from mimlab.transfer.tasks.options import KEYPOINTS as KEYPOINTS_OPTIONS

OPTIONS = KEYPOINTS_OPTIONS


def box_crop(bbox: np.ndarray, aspect: float, box_scale: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """Centre and (w, h) of the crop for a box: widened to `aspect` = w/h, then scaled by `box_scale`."""
    x, y, w, h = bbox
    if w > aspect * h:
        h = w / aspect
    else:
        w = h * aspect
    return (x + bbox[2] / 2, y + bbox[3] / 2), (w * box_scale, h * box_scale)


def gaussian_targets(pts: np.ndarray, valid: np.ndarray, hm_size: tuple[int, int], sigma: float) -> np.ndarray:
    """(K, h, w) Gaussians centred at `pts` given in heatmap pixel-index coordinates; zero where not `valid`."""
    w, h = hm_size
    xs, ys = np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)
    gx = np.exp(-((xs[None] - pts[:, :1]) ** 2) / (2 * sigma ** 2))
    gy = np.exp(-((ys[None] - pts[:, 1:2]) ** 2) / (2 * sigma ** 2))
    return (gy[:, :, None] * gx[:, None, :] * valid[:, None, None]).astype(np.float32)


def decode_heatmaps(hm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, K, h, w) -> (N, K, 2) heatmap pixel-index coordinates (argmax + quarter offset) and (N, K) maxima."""
    n, k, h, w = hm.shape
    flat = hm.reshape(n, k, -1)
    idx = flat.argmax(-1)
    maxval = flat.max(-1)
    x, y = (idx % w).astype(np.float64), (idx // w).astype(np.float64)
    for i in range(n):
        for j in range(k):
            xi, yi = int(x[i, j]), int(y[i, j])
            if 0 < xi < w - 1:
                x[i, j] += 0.25 * np.sign(hm[i, j, yi, xi + 1] - hm[i, j, yi, xi - 1])
            if 0 < yi < h - 1:
                y[i, j] += 0.25 * np.sign(hm[i, j, yi + 1, xi] - hm[i, j, yi - 1, xi])
    return np.stack([x, y], -1), maxval


class KeypointModel(TransferModel):
    def __init__(self, backbone: Backbone, k: int, num_deconv: int, channels: int, frozen: bool):
        super().__init__(backbone, HeatmapHead(backbone.embed_dim, k, num_deconv, channels), frozen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.run_backbone(self.backbone.features_map, x))


class KeypointDataset(SeededDataset):
    def __init__(self, kset: KeypointSet, size: tuple[int, int], hm_size: tuple[int, int], mean, std, opts: dict,
                 perm: np.ndarray, train: bool):
        self.kset, self.size, self.hm_size, self.mean, self.std = kset, size, hm_size, mean, std
        self.opts, self.perm, self.train = opts, perm, train
        self.stride = size[0] / hm_size[0]

    def __len__(self) -> int:
        return len(self.kset.instances)

    def matrix(self, inst: Instance, rng: np.random.Generator | None) -> tuple[np.ndarray, bool]:
        center, wh = box_crop(inst.bbox, self.size[0] / self.size[1], self.opts["box_scale"])
        rot, flip = 0.0, False
        if rng is not None:
            sj = self.opts["scale_jitter"]
            s = float(np.clip(rng.normal() * sj + 1, 1 - sj, 1 + sj))
            wh = (wh[0] * s, wh[1] * s)
            if rng.random() < 0.6:
                rot = math.radians(rng.uniform(-self.opts["rotation"], self.opts["rotation"]))
            flip = bool(rng.random() < 0.5)
        return crop_matrix(center, wh, self.size, rotation=rot, flip=flip), flip

    def get(self, index: int, seed: int) -> dict[str, torch.Tensor]:
        inst = self.kset.instances[index]
        img = load_rgb(self.kset.images[inst.image_id]["path"])
        m, flip = self.matrix(inst, np.random.default_rng(seed) if self.train else None)
        crop = warp(img, m, self.size)
        kps = inst.keypoints[self.perm] if flip else inst.keypoints
        uv = apply(np.linalg.inv(m), kps[:, :2] + 0.5)
        inside = (uv[:, 0] >= 0) & (uv[:, 0] < self.size[0]) & (uv[:, 1] >= 0) & (uv[:, 1] < self.size[1])
        valid = (kps[:, 2] > 0) & inside
        target = gaussian_targets(uv / self.stride - 0.5, valid, self.hm_size, self.opts["heatmap_sigma"])
        return {"image": to_tensor(crop, self.mean, self.std), "target": torch.from_numpy(target),
                "weight": torch.from_numpy(valid.astype(np.float32))}


def build(data: str, backbone: Backbone, opts: dict[str, Any], mode: str, eval_batch_size: int) -> TaskRun:
    splits = find_coco_splits(data)
    train_set_k = load_coco_keypoints(*splits["train"])
    val_set_k = load_coco_keypoints(*splits["val"])
    if train_set_k.names != val_set_k.names:
        raise MimlabError(f"{splits['val'][0]}: keypoint names differ from {splits['train'][0]}")
    if not train_set_k.instances or not val_set_k.instances:
        raise ConfigError("data", f"{data}: no annotated (non-crowd, labelled) instances in train or val")
    names = train_set_k.names
    k = len(names)
    pairs = parse_flip_pairs(opts["flip_pairs"], k) if opts["flip_pairs"] else flip_pairs(names)
    perm = np.arange(k)
    for a, b in pairs:
        perm[a], perm[b] = b, a
    sigmas_override = None
    if opts["kpt_sigmas"]:
        try:
            sigmas_override = [float(v) for v in opts["kpt_sigmas"].split(",")]
        except ValueError:
            raise ConfigError("kpt_sigmas", f"'{opts['kpt_sigmas']}': expected comma-separated numbers") from None
    sigmas = keypoint_sigmas(names, sigmas_override)
    if opts["num_deconv"] < 0:
        raise ConfigError("num_deconv", f"must be >= 0, got {opts['num_deconv']}")
    for name in ("heatmap_sigma", "box_scale"):
        if opts[name] <= 0:
            raise ConfigError(name, f"must be > 0, got {opts[name]}")
    ih, iw = backbone.info.img_size
    up = 2 ** opts["num_deconv"]
    hm_size = (iw // backbone.stride * up, ih // backbone.stride * up)
    size = (iw, ih)
    mean, std = backbone.info.mean, backbone.info.std
    train_ds = KeypointDataset(train_set_k, size, hm_size, mean, std, opts, perm, True)
    val_ds = KeypointDataset(val_set_k, size, hm_size, mean, std, opts, perm, False)
    model = KeypointModel(backbone, k, opts["num_deconv"], opts["head_channels"], frozen=mode == "linear")

    def loss_fn(net, batch):
        return heatmap_mse(net(batch["image"]), batch["target"], batch["weight"])

    def predict(m: KeypointModel, device: torch.device) -> list[dict]:
        results = []
        insts = val_set_k.instances
        m.eval()
        with torch.no_grad():
            for start in range(0, len(insts), eval_batch_size):
                idx = range(start, min(start + eval_batch_size, len(insts)))
                x = torch.stack([val_ds[i]["image"] for i in idx]).to(device)
                hm = m(x)
                if opts["flip_test"]:
                    hf = m(torch.flip(x, dims=[3]))
                    hm = (hm + torch.flip(hf, dims=[3])[:, perm]) / 2
                coords, maxval = decode_heatmaps(hm.float().cpu().numpy())
                for j, i in enumerate(idx):
                    inst = insts[i]
                    mat, _ = val_ds.matrix(inst, None)
                    xy = apply(mat, (coords[j] + 0.5) * val_ds.stride) - 0.5
                    kp = np.concatenate([xy, maxval[j][:, None]], 1)
                    results.append({"image_id": inst.image_id, "category_id": val_set_k.category_id,
                                    "keypoints": [round(float(v), 3) for v in kp.ravel()],
                                    "score": float(maxval[j].mean())})
        return results

    def evaluate(m: KeypointModel, device: torch.device) -> dict[str, float]:
        return coco_keypoint_ap(val_set_k.coco, predict(m, device), sigmas, [val_set_k.category_id])

    def baseline() -> dict[str, float]:
        results = []
        for inst in val_set_k.instances:
            x, y, w, h = inst.bbox
            kp = np.tile([x + w / 2 - 0.5, y + h / 2 - 0.5, 1.0], k)
            results.append({"image_id": inst.image_id, "category_id": val_set_k.category_id,
                            "keypoints": [float(v) for v in kp], "score": 1.0})
        return coco_keypoint_ap(val_set_k.coco, results, sigmas, [val_set_k.category_id])

    info = {"format": "coco_keypoints", "train_ann": str(splits["train"][0]), "val_ann": str(splits["val"][0]),
            "num_keypoints": k, "keypoints": names, "flip_pairs": [list(p) for p in pairs],
            "sigmas": [float(s) for s in sigmas], "num_train": len(train_set_k.instances),
            "num_val": len(val_set_k.instances), "input_size": [ih, iw], "heatmap_size": [hm_size[1], hm_size[0]]}
    return TaskRun(model=model, train_set=train_ds, loss_fn=loss_fn, evaluate=evaluate, baseline=baseline,
                   data_info=info)
