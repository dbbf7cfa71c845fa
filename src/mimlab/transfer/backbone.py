"""The backbone adapter: a timm ViT-family (or Swin) model seen as pooled features, a patch feature map, or a
one-stream template+search encoder; plus the layer ablation (drop / re-initialise the last K blocks).

- `features_map(x)`: the last block's patch tokens after the final norm as (B, C, gh, gw); prefix tokens (CLS,
  distillation, registers) are dropped using `model.num_prefix_tokens`, never assumed. Swin: its NHWC output.
- `pooled(x, pool)`: mean of the patch tokens ("mean") or the first prefix token ("cls").
- `one_stream(template, search)`: OSTrack-style joint encoding (Ye et al. 2022). Each region is patch-embedded on
  its own and gets the backbone's absolute position embedding resampled (bicubic) to its own grid; the prefix
  tokens, the template tokens and the search tokens are concatenated and go through all blocks together; the
  search tokens come back as a feature map. Needs an absolute position embedding (ViT, DeiT); relative-position
  models (BEiT, Swin) are refused with a clear error.
- Ablation: `drop_last_blocks(model, K)` removes the last K blocks (the final norm stays);
  `reinit_last_blocks(model, K, fresh)` copies the last K blocks from `fresh`, a newly initialised model of the
  same architecture (so "re-initialised" means exactly the architecture's own initialisation).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mimlab.data.images import IMAGENET_MEAN, IMAGENET_STD
from mimlab.errors import ConfigError, MimlabError


def block_slots(model: nn.Module) -> list[tuple[nn.Module, int]]:
    """The transformer blocks in forward order, as (container, index) pairs.

    ViT/DeiT/BEiT: `model.blocks`; Swin: the `blocks` of each stage in `model.layers`.
    """
    if isinstance(getattr(model, "blocks", None), (nn.Sequential, nn.ModuleList)):
        return [(model.blocks, i) for i in range(len(model.blocks))]
    layers = getattr(model, "layers", None)
    if isinstance(layers, (nn.Sequential, nn.ModuleList)) and all(hasattr(s, "blocks") for s in layers):
        return [(s.blocks, i) for s in layers for i in range(len(s.blocks))]
    raise MimlabError(f"{type(model).__name__}: cannot find its transformer blocks (expected .blocks or "
                      ".layers[i].blocks)")


def drop_last_blocks(model: nn.Module, k: int) -> None:
    """Remove the last `k` transformer blocks in place (the final norm and the head stay)."""
    if k <= 0:
        return
    slots = block_slots(model)
    if k >= len(slots):
        raise ConfigError("drop_last_blocks", f"{k}: the model has only {len(slots)} blocks (at least one must stay)")
    if isinstance(getattr(model, "blocks", None), (nn.Sequential, nn.ModuleList)):
        model.blocks = model.blocks[: len(model.blocks) - k]
        return
    last = model.layers[-1]
    if k >= len(last.blocks):
        raise ConfigError("drop_last_blocks", f"{k}: for hierarchical models only blocks of the last stage can be "
                                              f"dropped (it has {len(last.blocks)}; at least one must stay)")
    last.blocks = last.blocks[: len(last.blocks) - k]


def reinit_last_blocks(model: nn.Module, k: int, fresh: nn.Module) -> None:
    """Overwrite the last `k` blocks of `model` with the weights of the same blocks in `fresh`."""
    if k <= 0:
        return
    slots, fresh_slots = block_slots(model), block_slots(fresh)
    if k > len(slots):
        raise ConfigError("reinit_last_blocks", f"{k}: the model has only {len(slots)} blocks")
    for (cont, i), (fcont, fi) in zip(slots[-k:], fresh_slots[len(fresh_slots) - len(slots):][-k:]):
        cont[i].load_state_dict(fcont[fi].state_dict(), strict=True)


def _prefix_tokens(model: nn.Module, batch: int) -> list[torch.Tensor]:
    """The prefix tokens in timm's order: cls, dist (DeiT distilled), registers."""
    out = []
    for name in ("cls_token", "dist_token", "reg_token"):
        t = getattr(model, name, None)
        if t is not None:
            out.append(t.expand(batch, -1, -1))
    return out


@dataclass
class BackboneInfo:
    label: str
    arch: str
    checkpoint: str | None
    model_kwargs: dict[str, Any]
    embed_dim: int
    num_blocks: int
    num_prefix_tokens: int
    patch_size: tuple[int, int]
    img_size: tuple[int, int]
    drop_last_blocks: int = 0
    reinit_last_blocks: int = 0
    load_report: dict[str, Any] | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    extra: dict[str, Any] = field(default_factory=dict)
    random_init: bool = False                 # no checkpoint: an untrained backbone (warned on stderr)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


class Backbone(nn.Module):
    """Wraps a headless timm model; see the module docstring for the three views it offers."""

    def __init__(self, model: nn.Module, info: BackboneInfo):
        super().__init__()
        self.model = model
        self.info = info
        self.is_hierarchical = not isinstance(getattr(model, "blocks", None), (nn.Sequential, nn.ModuleList))

    @property
    def embed_dim(self) -> int:
        return self.info.embed_dim

    @property
    def stride(self) -> int:
        """Pixels per feature-map cell of `features_map` (patch size; Swin: its total reduction)."""
        if self.is_hierarchical:
            return int(self.model.feature_info[-1]["reduction"])
        return int(self.info.patch_size[0])

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)

    def features_map(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model.forward_features(x)
        if out.ndim == 4:  # Swin: (B, H, W, C)
            return out.permute(0, 3, 1, 2).contiguous()
        p = self.info.num_prefix_tokens
        gh, gw = x.shape[-2] // self.info.patch_size[0], x.shape[-1] // self.info.patch_size[1]
        patches = out[:, p:]
        if patches.shape[1] != gh * gw:
            raise MimlabError(f"backbone returned {patches.shape[1]} patch tokens for a {gh}x{gw} grid")
        return patches.transpose(1, 2).reshape(out.shape[0], out.shape[2], gh, gw)

    def pooled(self, x: torch.Tensor, pool: str = "mean") -> torch.Tensor:
        out = self.model.forward_features(x)
        if out.ndim == 4:
            if pool != "mean":
                raise ConfigError("pool", f"{pool}: {self.info.arch} has no CLS token; use pool='mean' (--pool mean)")
            return out.mean(dim=(1, 2))
        if pool == "cls":
            if self.info.num_prefix_tokens == 0:
                raise ConfigError("pool", f"cls: {self.info.arch} has no prefix (CLS) token; use pool='mean' "
                                          "(--pool mean)")
            return out[:, 0]
        return out[:, self.info.num_prefix_tokens:].mean(1)

    # ---------------------------------------------------------------------------------------------- one-stream
    def check_one_stream(self) -> None:
        m = self.model
        if self.is_hierarchical or getattr(m, "pos_embed", None) is None or not hasattr(m, "patch_embed"):
            raise ConfigError("task", f"track: {self.info.arch} has no absolute position embedding (relative position "
                                      "bias or a hierarchical model); the one-stream tracker needs a ViT/DeiT-style "
                                      "backbone")

    def _embed_region(self, img: torch.Tensor) -> torch.Tensor:
        from timm.layers import resample_abs_pos_embed

        m = self.model
        pe = m.patch_embed
        x = pe.proj(img)
        gh, gw = x.shape[-2:]
        x = pe.norm(x.flatten(2).transpose(1, 2))
        n_pos_prefix = 0 if getattr(m, "no_embed_class", False) else self.info.num_prefix_tokens
        pos = m.pos_embed[:, n_pos_prefix:]
        pos = resample_abs_pos_embed(pos, new_size=(gh, gw), old_size=pe.grid_size, num_prefix_tokens=0)
        return x + pos

    def one_stream(self, template: torch.Tensor, search: torch.Tensor) -> torch.Tensor:
        """Search-region feature map (B, C, gh_s, gw_s) after joint encoding with the template."""
        m = self.model
        b = template.shape[0]
        t, s = self._embed_region(template), self._embed_region(search)
        prefix = _prefix_tokens(m, b)
        if prefix:
            pre = torch.cat(prefix, 1)
            if not getattr(m, "no_embed_class", False):
                pre = pre + m.pos_embed[:, : pre.shape[1]]
            x = torch.cat([pre, t, s], 1)
        else:
            x = torch.cat([t, s], 1)
        x = m.pos_drop(x)
        x = m.norm_pre(x) if hasattr(m, "norm_pre") else x
        for blk in m.blocks:
            x = blk(x)
        x = m.norm(x)
        gh, gw = search.shape[-2] // self.info.patch_size[0], search.shape[-1] // self.info.patch_size[1]
        return x[:, -gh * gw:].transpose(1, 2).reshape(b, x.shape[2], gh, gw)


# a checkpoint's classifier: transfer puts the task's head in its place
CLASSIFIER_KEYS = ("head.*", "head_dist.*", "pre_logits.*")


def build_backbone(spec_text: str, model_kwargs: dict[str, Any] | None = None, *, drop_last: int = 0,
                   reinit_last: int = 0, seed: int = 0, normalize: str = "imagenet") -> Backbone:
    """Parse `[LABEL=]ARCH[@CHECKPOINT]`, build the headless timm model, load the checkpoint strictly (its
    classifier head, if any, is dropped), then apply the layer ablation.

    `normalize`: input mean/std -- "imagenet" (what `mimlab pretrain`, SimMIM, MAE and DeiT use) or "timm" (the
    architecture's `pretrained_cfg`, e.g. 0.5/0.5 for the JAX-trained ViTs)."""
    from mimlab.models.factory import create_model, parse_model_spec

    for name, value in (("drop_last_blocks", drop_last), ("reinit_last_blocks", reinit_last)):
        if value < 0:
            raise ConfigError(name, f"must be >= 0, got {value}")
    if normalize not in ("imagenet", "timm"):
        raise ConfigError("normalize", f"must be 'imagenet' or 'timm', got '{normalize}'")
    if drop_last and reinit_last:
        raise ConfigError("drop_last_blocks", "and reinit_last_blocks are separate ablations: use one of them")
    spec = parse_model_spec(spec_text, model_kwargs)
    torch.manual_seed(seed)
    model, report = create_model(spec.arch, spec.kwargs, checkpoint=None, num_classes=0)
    if spec.checkpoint is not None:
        from mimlab.models.checkpoints import load_checkpoint

        report = load_checkpoint(model, spec.checkpoint, drop_keys=("fc_norm.*",), allow_missing=("fc_norm.*",),
                                 unused=CLASSIFIER_KEYS, resize_pos_embed="img_size" in spec.kwargs)
        if report.unused_dropped:
            print(f"{spec.label}: the task's own head replaces the checkpoint's classifier "
                  f"({', '.join(report.unused_dropped[:6])})", file=sys.stderr)
        if report.resized:
            print(f"{spec.label}: resampled {', '.join(report.resized)} to img_size {spec.kwargs['img_size']}",
                  file=sys.stderr)
        if report.cast_line():                  # recorded in metrics.json with the load report
            print(f"{spec.label}: {report.cast_line()}", file=sys.stderr)
        if report.constant_warning():
            print(f"WARNING: {spec.label}: {report.constant_warning()}", file=sys.stderr)
    elif os.environ.get("RANK", "0") == "0":
        print(f"WARNING: {spec.label} has no checkpoint: RANDOM INITIALISATION (seed {seed}); this transfer measures "
              "an untrained backbone", file=sys.stderr)
    n_blocks = len(block_slots(model))
    if reinit_last:
        if reinit_last > n_blocks:
            raise ConfigError("reinit_last_blocks", f"{reinit_last}: {spec.arch} has only {n_blocks} blocks")
        torch.manual_seed(seed + 1)
        fresh, _ = create_model(spec.arch, spec.kwargs, checkpoint=None, num_classes=0)
        reinit_last_blocks(model, reinit_last, fresh)
    drop_last_blocks(model, drop_last)
    pe = getattr(model, "patch_embed", None)
    patch = tuple(pe.patch_size) if pe is not None else (4, 4)
    img_size = tuple(pe.img_size) if pe is not None and pe.img_size is not None else (224, 224)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = ((IMAGENET_MEAN, IMAGENET_STD) if normalize == "imagenet" else
                 (tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))))
    info = BackboneInfo(label=spec.label, arch=spec.arch, checkpoint=spec.checkpoint, model_kwargs=dict(spec.kwargs),
                        embed_dim=int(model.num_features), num_blocks=len(block_slots(model)),
                        num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 0)), patch_size=patch,
                        img_size=img_size, drop_last_blocks=drop_last, reinit_last_blocks=reinit_last,
                        load_report=report.to_dict() if report is not None else None,
                        mean=mean, std=std, random_init=spec.checkpoint is None)
    return Backbone(model, info)
