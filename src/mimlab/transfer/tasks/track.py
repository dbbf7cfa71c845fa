"""Single-object tracking: a one-stream ViT tracker (OSTrack-like; Ye et al. 2022) trained on frame pairs and
evaluated with the one-pass protocol (see `metrics/tracking.py`).

- Crops are squares: the template is sqrt(w h) * template_factor (2) around the target, resized to
  `template_size`; the search region is sqrt(w h) * search_factor (4), resized to `search_size` (default: the
  backbone's input size). Outside the frame: the frame's mean colour.
- Training pairs: a random valid frame of a random sequence for the template, another within `max_gap` frames
  for the search region, whose centre and size are jittered (OSTrack: centre offset up to
  +- search_center_jitter/2 * sqrt(w h), size x exp(N(0, search_scale_jitter))).
- Head (`heads.CenterBoxHead`) on the search tokens' feature map: centre-score logits, size (fraction of the
  search region) and sub-cell offset. Loss = focal(score, Gaussian at the target cell)
  + 5 * L1(size, offset at the target cell) + 2 * GIoU(box at the target cell), OSTrack's weights.
- Inference (OPE): template from the first frame's ground-truth box; each following frame is searched around
  the previous prediction; the score map is multiplied by a Hann window; the best cell gives the box. The first
  frame's output is the ground-truth box, as in the OTB/LaSOT toolkits.
"""
from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mimlab.engine import SeededDataset
from mimlab.errors import ConfigError, MimlabError
from mimlab.transfer.backbone import Backbone
from mimlab.transfer.datasets.common import load_rgb
from mimlab.transfer.datasets.tracking import Sequence, find_tracking_splits
from mimlab.transfer.geometry import apply, crop_matrix, to_tensor, warp
from mimlab.transfer.heads import CenterBoxHead
from mimlab.transfer.losses import center_focal_loss, giou_loss_xyxy
from mimlab.transfer.metrics.tracking import tracking_metrics
from mimlab.transfer.tasks.base import TaskRun, TransferModel
from mimlab.transfer.tasks.options import TRACK as TRACK_OPTIONS

OPTIONS = TRACK_OPTIONS


class TrackModel(TransferModel):
    def __init__(self, backbone: Backbone, channels: int, frozen: bool):
        backbone.check_one_stream()
        super().__init__(backbone, CenterBoxHead(backbone.embed_dim, channels), frozen)

    def forward(self, template: torch.Tensor, search: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head(self.run_backbone(self.backbone.one_stream, template, search))


def square_crop(box: np.ndarray, factor: float, out: int) -> np.ndarray:
    """Crop matrix of the square of side sqrt(w h) * factor centred on `box` (x, y, w, h)."""
    side = math.sqrt(box[2] * box[3]) * factor
    return crop_matrix((box[0] + box[2] / 2, box[1] + box[3] / 2), (side, side), (out, out))


def decode_box(out: dict[str, torch.Tensor], window: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 4) boxes x0, y0, x1, y1 as fractions of the search region, from the best (windowed) cell."""
    score = torch.sigmoid(out["score"][:, 0])
    b, g, _ = score.shape
    if window is not None:
        score = score * window
    idx = score.flatten(1).argmax(1)
    cy, cx = (idx // g).float(), (idx % g).float()
    ar = torch.arange(b, device=idx.device)
    off = out["offset"].flatten(2)[ar, :, idx]
    size = out["size"].flatten(2)[ar, :, idx]
    ctr = torch.stack([(cx + off[:, 0]) / g, (cy + off[:, 1]) / g], 1)
    return torch.cat([ctr - size / 2, ctr + size / 2], 1)


class PairDataset(SeededDataset):
    def __init__(self, seqs: list[Sequence], opts: dict, t_size: int, s_size: int, grid: int, mean, std):
        self.seqs = [s for s in seqs if s.valid.sum() >= 2]
        if not self.seqs:
            raise MimlabError("track: no training sequence has two frames with a valid box")
        self.opts, self.t_size, self.s_size, self.grid, self.mean, self.std = opts, t_size, s_size, grid, mean, std

    def __len__(self) -> int:
        return len(self.seqs) * self.opts["pairs_per_sequence"]

    def get(self, index: int, seed: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng(seed)
        seq = self.seqs[index % len(self.seqs)]
        valid = np.flatnonzero(seq.valid)
        t0 = int(rng.choice(valid))
        near = valid[(np.abs(valid - t0) <= self.opts["max_gap"]) & (valid != t0)]
        t1 = int(rng.choice(near)) if near.size else t0
        tb, sb = seq.boxes[t0], seq.boxes[t1]
        template = warp(load_rgb(seq.frames[t0]), square_crop(tb, self.opts["template_factor"], self.t_size),
                        (self.t_size, self.t_size))
        wh = sb[2:] * np.exp(rng.normal(0, self.opts["search_scale_jitter"], 2))
        max_off = math.sqrt(wh[0] * wh[1]) * self.opts["search_center_jitter"]
        ctr = sb[:2] + sb[2:] / 2 + max_off * (rng.random(2) - 0.5)
        m = square_crop(np.array([ctr[0] - wh[0] / 2, ctr[1] - wh[1] / 2, wh[0], wh[1]]),
                        self.opts["search_factor"], self.s_size)
        search = warp(load_rgb(seq.frames[t1]), m, (self.s_size, self.s_size))
        inv = np.linalg.inv(m)
        corners = apply(inv, np.array([sb[:2], sb[:2] + sb[2:]])) / self.s_size  # normalised x0y0, x1y1
        box = np.clip(corners.ravel(), 0.0, 1.0)
        g = self.grid
        c = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]) * g
        cell = np.clip(np.floor(c), 0, g - 1)
        size = np.clip([box[2] - box[0], box[3] - box[1]], 1e-3, 1.0)
        sigma = max(0.5, math.sqrt(size[0] * size[1]) * g / 4)
        ys, xs = np.mgrid[0:g, 0:g]
        heat = np.exp(-((xs - cell[0]) ** 2 + (ys - cell[1]) ** 2) / (2 * sigma ** 2)).astype(np.float32)
        return {"template": to_tensor(template, self.mean, self.std), "search": to_tensor(search, self.mean, self.std),
                "heatmap": torch.from_numpy(heat)[None], "index": torch.tensor(int(cell[1] * g + cell[0])),
                "size": torch.tensor(size, dtype=torch.float32),
                "offset": torch.tensor(np.clip(c - cell, 0, 1), dtype=torch.float32),
                "box": torch.tensor(box, dtype=torch.float32)}


def track_sequences(model: TrackModel, seqs: list[Sequence], opts: dict, t_size: int, s_size: int, mean, std,
                    device: torch.device, batch: int) -> list[np.ndarray]:
    """One-pass tracking of every sequence (batched across sequences); returns (N_i, 4) x, y, w, h per sequence."""
    g = s_size // model.backbone.stride
    hann = torch.hann_window(g + 2, periodic=False, device=device)[1:-1]
    window = (hann[:, None] * hann[None, :])[None]
    results = []
    model.eval()
    for start in range(0, len(seqs), batch):
        chunk = seqs[start:start + batch]
        for s in chunk:
            if not s.valid[0]:
                raise MimlabError(f"track: sequence {s.name} has no valid box in its first frame")
        with torch.no_grad():
            templates = torch.stack([to_tensor(warp(load_rgb(s.frames[0]), square_crop(s.boxes[0],
                                     opts["template_factor"], t_size), (t_size, t_size)), mean, std)
                                     for s in chunk]).to(device)
        state = [s.boxes[0].astype(np.float64).copy() for s in chunk]
        preds = [[s.boxes[0].copy()] for s in chunk]
        for t in range(1, max(len(s.frames) for s in chunk)):
            active = [i for i, s in enumerate(chunk) if t < len(s.frames)]
            crops, mats, sizes = [], [], []
            for i in active:
                img = load_rgb(chunk[i].frames[t])
                m = square_crop(state[i], opts["search_factor"], s_size)
                crops.append(to_tensor(warp(img, m, (s_size, s_size)), mean, std))
                mats.append(m)
                sizes.append(img.shape[:2])
            with torch.no_grad():
                out = model(templates[active], torch.stack(crops).to(device))
                boxes = decode_box(out, window).float().cpu().numpy() * s_size
            for j, i in enumerate(active):
                p = apply(mats[j], boxes[j].reshape(2, 2))
                h, w = sizes[j]
                x0, y0 = np.clip(p[0], 0, [w - 1, h - 1])
                x1, y1 = np.clip(p[1], [x0 + 1, y0 + 1], [w, h])
                state[i] = np.array([x0, y0, x1 - x0, y1 - y0])
                preds[i].append(state[i].copy())
        results += [np.asarray(p) for p in preds]
    return results


def _scored(seqs: list[Sequence]) -> tuple[list[Sequence], list[Sequence]]:
    """The evaluation sequences with ground truth beyond the first frame, and those without (a test split's
    first-frame-only layout), which cannot be scored: said in one line, counted in the data info."""
    withheld = [s for s in seqs if s.first_frame_only]
    if withheld:
        print(f"track: {len(withheld)} evaluation sequence(s) have only their first frame's box (a test split's "
              f"layout, e.g. {withheld[0].groundtruth}): not scored", file=sys.stderr)
    return [s for s in seqs if not s.first_frame_only], withheld


def build(data: str, backbone: Backbone, opts: dict[str, Any], mode: str, eval_batch_size: int) -> TaskRun:
    backbone.check_one_stream()
    train_seqs, val_seqs = find_tracking_splits(data)
    val_seqs, withheld = _scored(val_seqs)
    s_size = opts["search_size"] or backbone.info.img_size[0]
    t_size = opts["template_size"] or s_size // 2
    stride = backbone.stride
    for name, size in (("search_size", s_size), ("template_size", t_size)):
        if size % stride:
            raise ConfigError(name, f"{size} must be a multiple of the patch size {stride}")
    for name in ("template_factor", "search_factor", "pairs_per_sequence"):
        if opts[name] <= 0:
            raise ConfigError(name, "must be > 0")
    grid = s_size // stride
    mean, std = backbone.info.mean, backbone.info.std
    train_ds = PairDataset(train_seqs, opts, t_size, s_size, grid, mean, std)
    model = TrackModel(backbone, opts["head_channels"], frozen=mode == "linear")

    def loss_fn(net, batch):
        out = net(batch["template"], batch["search"])
        focal = center_focal_loss(out["score"].float(), batch["heatmap"])
        b = batch["index"].shape[0]
        ar = torch.arange(b, device=batch["index"].device)
        size = out["size"].float().flatten(2)[ar, :, batch["index"]]
        off = out["offset"].float().flatten(2)[ar, :, batch["index"]]
        l1 = F.l1_loss(size, batch["size"]) + F.l1_loss(off, batch["offset"])
        cell = torch.stack([batch["index"] % grid, batch["index"] // grid], 1).float()
        ctr = (cell + off) / grid
        giou = giou_loss_xyxy(torch.cat([ctr - size / 2, ctr + size / 2], 1), batch["box"])
        return focal + 5 * l1 + 2 * giou, {"focal": focal.detach(), "l1": l1.detach(), "giou": giou.detach()}

    def evaluate(m: TrackModel, device: torch.device) -> dict[str, float]:
        preds = track_sequences(m, val_seqs, opts, t_size, s_size, mean, std, device, eval_batch_size)
        return tracking_metrics([(p, s.boxes) for p, s in zip(preds, val_seqs)])

    def baseline() -> dict[str, float]:
        return tracking_metrics([(np.repeat(s.boxes[:1], len(s.boxes), 0), s.boxes) for s in val_seqs])

    info = {"format": "got10k/lasot", "num_train_sequences": len(train_ds.seqs),
            # sequences with fewer than two frames with a valid box cannot give a (template, search) pair
            "num_train_sequences_dropped": len(train_seqs) - len(train_ds.seqs),
            "num_val_sequences": len(val_seqs), "num_val_frames": int(sum(len(s.frames) for s in val_seqs)),
            "num_val_first_frame_only": len(withheld),
            "template_size": t_size, "search_size": s_size, "pairs_per_epoch": len(train_ds)}
    return TaskRun(model=model, train_set=train_ds, loss_fn=loss_fn, evaluate=evaluate, baseline=baseline,
                   data_info=info)
