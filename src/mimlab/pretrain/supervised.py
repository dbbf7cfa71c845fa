"""Supervised pretraining: cross-entropy with label smoothing, optional mixup/cutmix (timm `Mixup`)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mimlab.errors import MimlabError


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``mean_b sum_c -t[b, c] log softmax(z)[b, c]`` for soft targets (B, C)."""
    return (-targets * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


class Supervised(nn.Module):
    """``forward(images) -> logits``; the loss is computed by `SupervisedLoss` (mixup happens outside forward)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        if getattr(encoder, "num_classes", 0) in (0, None):
            raise MimlabError("supervised pretraining needs a classifier head: build the model with num_classes > 0")
        self.encoder = encoder

    def no_weight_decay(self) -> set[str]:
        fn = getattr(self.encoder, "no_weight_decay", None)
        return {f"encoder.{n}" for n in fn()} if callable(fn) else set()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)


class SupervisedLoss:
    """loss_fn(net, batch) for the engine: CE with label smoothing, or soft CE after mixup/cutmix."""

    def __init__(self, num_classes: int, *, label_smoothing: float = 0.1, mixup: float = 0.0, cutmix: float = 0.0):
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.mixup = None
        if mixup > 0 or cutmix > 0:
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing,
                               num_classes=num_classes)

    def __call__(self, net: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch["image"], batch["label"]
        if self.mixup is not None:
            if x.shape[0] % 2:
                raise MimlabError("mixup/cutmix need an even per-process batch size")
            x, soft = self.mixup(x, y)
            logits = net(x)
            return soft_cross_entropy(logits, soft), {}
        logits = net(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        acc = (logits.detach().argmax(dim=-1) == y).float().mean()
        return loss, {"acc": acc}
