"""What every transfer task provides to the runner, and the pieces they share (frozen backbone, param groups)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from mimlab.errors import ConfigError
from mimlab.transfer.backbone import Backbone

@dataclass
class TaskRun:
    """A task bound to its data and backbone: the engine trains `model` with `loss_fn` on `train_set`; the runner
    then calls `evaluate(model, device)` and `baseline()` (the trivial baseline on the same evaluation split)."""

    model: nn.Module
    train_set: Any
    loss_fn: Callable[[nn.Module, Any], Any]
    evaluate: Callable[[nn.Module, torch.device], dict[str, float]]
    baseline: Callable[[], dict[str, float]]
    data_info: dict[str, Any]
    collate_fn: Callable | None = None
    find_unused_parameters: bool = False


class TransferModel(nn.Module):
    """Backbone + head. With `frozen`, the backbone stays in eval mode and runs without gradients (linear probe)."""

    def __init__(self, backbone: Backbone, head: nn.Module, frozen: bool = False):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.frozen = frozen
        if frozen:
            for p in self.backbone.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> "TransferModel":
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def run_backbone(self, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        if self.frozen:
            with torch.no_grad():
                return fn(*args)
        return fn(*args)


def param_groups(model: TransferModel, weight_decay: float, layer_decay: float | None) -> list[dict[str, Any]]:
    """AdamW groups: the engine's weight-decay split; with `layer_decay` < 1, the backbone's groups come from timm's
    `param_groups_layer_decay` (BEiT-style). timm numbers the layers stem = 0, block i = i + 1, the final norm with
    the last block (L = number of blocks), and scales the lr by layer_decay^(L - layer); the head gets scale 1."""
    from mimlab.engine import param_groups_weight_decay

    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise ConfigError("layer_decay", f"must be in (0, 1], got {layer_decay}")
    if model.frozen or layer_decay is None or layer_decay == 1.0:
        return param_groups_weight_decay(model, weight_decay)
    from timm.optim import param_groups_layer_decay

    bb = model.backbone.model
    nwd = set(bb.no_weight_decay()) if hasattr(bb, "no_weight_decay") else set()
    groups = param_groups_layer_decay(bb, weight_decay=weight_decay, no_weight_decay_list=nwd,
                                      layer_decay=layer_decay)
    groups = [{k: v for k, v in g.items() if k != "param_names"} for g in groups]
    head_groups = param_groups_weight_decay(model.head, weight_decay)
    for g in head_groups:
        g["lr_scale"] = 1.0
    return groups + head_groups
