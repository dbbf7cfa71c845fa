"""Training losses of the dense and tracking heads (pure functions of tensors)."""
from __future__ import annotations

import torch


def heatmap_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """SimpleBaseline's joints MSE: mean over (B, K, h, w) of w_k * (pred - target)^2 / 2; `weight` is (B, K)."""
    return 0.5 * (((pred - target) ** 2).mean(dim=(2, 3)) * weight).mean()


def silog_loss(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor, lam: float = 0.85,
               alpha: float = 10.0) -> torch.Tensor:
    """Scale-invariant log loss (Eigen et al. 2014), in the form used by BTS (Lee et al. 2019):

        d_i = ln(pred_i) - ln(gt_i) over the valid pixels of the batch,
        L = alpha * sqrt(mean(d^2) - lam * mean(d)^2),   lam = 0.85, alpha = 10.
    """
    d = torch.log(pred[mask]) - torch.log(gt[mask])
    if d.numel() == 0:
        return pred.sum() * 0.0
    var = (d ** 2).mean() - lam * d.mean() ** 2
    return alpha * torch.sqrt(var.clamp_min(1e-12))


def center_focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 2.0,
                      beta: float = 4.0) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss (Zhou et al. 2019) on a Gaussian target heatmap with peaks of 1:

        L = -1/N * sum( (1-p)^a log p  at target == 1;  (1-y)^b p^a log(1-p)  elsewhere ),  N = number of peaks.
    """
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = target.eq(1).float()
    pos_loss = (torch.log(p) * (1 - p) ** alpha * pos).sum()
    neg_loss = (torch.log(1 - p) * p ** alpha * (1 - target) ** beta * (1 - pos)).sum()
    return -(pos_loss + neg_loss) / pos.sum().clamp_min(1.0)


def giou_loss_xyxy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - GIoU (Rezatofighi et al. 2019) of row-paired (N, 4) x0, y0, x1, y1 boxes."""
    iw = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp_min(0)
    ih = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp_min(0)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]).clamp_min(0) * (a[:, 3] - a[:, 1]).clamp_min(0)
    area_b = (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)
    union = area_a + area_b - inter
    iou = inter / union.clamp_min(1e-7)
    cw = torch.maximum(a[:, 2], b[:, 2]) - torch.minimum(a[:, 0], b[:, 0])
    ch = torch.maximum(a[:, 3], b[:, 3]) - torch.minimum(a[:, 1], b[:, 1])
    hull = (cw * ch).clamp_min(1e-7)
    return (1 - (iou - (hull - union) / hull)).mean()
