"""AdamW with the usual no-weight-decay set, fused where the platform has it."""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from torch import nn

# Parameter names (last dotted component) that never get weight decay: position embeddings, special tokens.
NO_DECAY_LEAVES = frozenset({
    "pos_embed", "absolute_pos_embed", "cls_token", "dist_token", "reg_token", "mask_token",
    "decoder_pos_embed", "relative_position_bias_table", "q_bias", "v_bias",
})
# Substrings that mark a no-decay parameter anywhere in its name (Swin/SwinV2 relative position machinery,
# as in the official SimMIM skip keywords).
NO_DECAY_KEYWORDS = ("relative_position_bias_table", "cpb_mlp", "logit_scale")


def model_no_weight_decay(model: nn.Module) -> set[str]:
    """Names from the model's own `no_weight_decay()` (timm convention), if it has one."""
    fn = getattr(model, "no_weight_decay", None)
    if callable(fn):
        return set(fn())
    return set()


def wants_decay(name: str, param: torch.Tensor, skip: Iterable[str] = (), skip_keywords: Sequence[str] = ()) -> bool:
    """The SimMIM/timm rule: no decay for 1-d tensors (biases, norms, LayerScale), `.bias`, listed names and
    keywords, position embeddings and special tokens."""
    if param.ndim <= 1 or name.endswith(".bias"):
        return False
    if name in set(skip) or name.rsplit(".", 1)[-1] in NO_DECAY_LEAVES:
        return False
    return not any(k in name for k in (*NO_DECAY_KEYWORDS, *skip_keywords))


def param_groups_weight_decay(model: nn.Module, weight_decay: float, *, skip: Iterable[str] = (),
                              skip_keywords: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Two groups: decayed weights and the no-decay set (see `wants_decay`); frozen parameters are left out."""
    skip = set(skip) | model_no_weight_decay(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if wants_decay(name, p, skip, skip_keywords) else no_decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _fused_ok(params: list[torch.Tensor]) -> bool:
    devices = {p.device.type for p in params}
    return len(devices) == 1 and devices <= {"cuda", "cpu", "xpu", "mps"} and all(p.is_floating_point() for p in params)


def build_adamw(groups: list[dict[str, Any]], *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                eps: float = 1e-8, fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW over `groups` (dicts with params, weight_decay, optional lr_scale). `fused=None`: fused if supported."""
    params = [p for g in groups for p in g["params"]]
    if fused is None:
        fused = _fused_ok(params)
    if fused:
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
        except (RuntimeError, ValueError):
            pass
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
