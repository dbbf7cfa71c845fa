"""SimMIM (Xie et al., "SimMIM: a Simple Framework for Masked Image Modeling", CVPR 2022) around timm encoders.

Faithful to the official recipe: the patch embeddings of masked tokens are replaced by one learned mask token
BEFORE position information is added; all tokens are encoded; a one-layer head (1x1 conv = a linear layer per
token) predicts ``encoder_stride^2 * 3`` values per output token, rearranged to pixels by PixelShuffle; the
target is the normalised input image; the loss is L1 over masked pixels only,
``sum_{masked pixels, channels} |pred - x| / (#masked pixels * channels)``.

Encoders: timm `VisionTransformer` (ViT, DeiT, DeiT-III; stride = patch size), `Beit` (the shape of the
official SimMIM ViT: relative position bias, LayerScale; stride = patch size) and `SwinTransformer` /
`SwinTransformerV2` (NHWC, the mask token enters after the patch embedding; stride = the last stage's
reduction, 32).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mimlab.errors import MimlabError

FAMILIES = ("vit", "beit", "swin")


def encoder_family(encoder: nn.Module) -> str:
    """'vit', 'beit' or 'swin' for the supported timm classes (by class, not by name)."""
    from timm.models.beit import Beit
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.swin_transformer_v2 import SwinTransformerV2
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(encoder, Beit):
        return "beit"
    if isinstance(encoder, (SwinTransformer, SwinTransformerV2)):
        return "swin"
    if isinstance(encoder, VisionTransformer):
        return "vit"
    raise MimlabError(f"SimMIM supports timm VisionTransformer, Beit, SwinTransformer and SwinTransformerV2 "
                      f"encoders; got {type(encoder).__name__}")


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def encoder_geometry(encoder: nn.Module) -> dict[str, Any]:
    """img_size, patch_size (px of one input token), token grid, encoder stride and widths of a timm encoder."""
    fam = encoder_family(encoder)
    pe = encoder.patch_embed
    img = _pair(pe.img_size)
    patch = _pair(pe.patch_size)
    if patch[0] != patch[1]:
        raise MimlabError(f"non-square patches {patch} are not supported")
    grid = _pair(pe.grid_size)
    if fam == "swin":
        stride = int(encoder.feature_info[-1]["reduction"])
        in_dim = int(encoder.embed_dim if isinstance(encoder.embed_dim, int) else encoder.embed_dim[0])
    else:
        stride = patch[0]
        in_dim = int(encoder.embed_dim)
    if img[0] % stride or img[1] % stride:
        raise MimlabError(f"image size {img} is not a multiple of the encoder stride {stride}")
    return {"family": fam, "img_size": img, "patch_size": patch[0], "token_grid": grid, "stride": stride,
            "embed_dim": in_dim, "out_dim": int(encoder.num_features),
            "num_prefix_tokens": int(getattr(encoder, "num_prefix_tokens", 0))}


def wrapper_no_weight_decay(encoder: nn.Module, own: tuple[str, ...] = ("mask_token",)) -> set[str]:
    """No-decay names of a pretraining wrapper: its own tokens plus the encoder's `no_weight_decay()` names."""
    names = set(own)
    fn = getattr(encoder, "no_weight_decay", None)
    if callable(fn):
        names |= {f"encoder.{n}" for n in fn()}
    return names


def masked_l1(pred: torch.Tensor, target: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
    """``sum(|pred - target| * m) / (sum(m) * C)`` with m (B, 1, H, W) in {0, 1} broadcast over C channels."""
    m = pixel_mask.to(pred.dtype)
    denom = m.sum() * pred.shape[1]
    return ((pred - target).abs() * m).sum() / denom


class SimMIM(nn.Module):
    """``forward(images, mask) -> (loss, logs)``; `mask` is (B, gh, gw) at the encoder's token resolution.

    The encoder (``self.encoder``) is left a plain timm model: its state dict is exactly the timm one.
    """

    def __init__(self, encoder: nn.Module, in_chans: int = 3):
        super().__init__()
        self.geom = encoder_geometry(encoder)
        self.family = self.geom["family"]
        self._check_encoder(encoder)
        self.encoder = encoder
        self.in_chans = in_chans
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.geom["embed_dim"]))
        nn.init.trunc_normal_(self.mask_token, mean=0.0, std=0.02)
        s = self.geom["stride"]
        self.decoder = nn.Sequential(nn.Conv2d(self.geom["out_dim"], s * s * in_chans, kernel_size=1),
                                     nn.PixelShuffle(s))

    def _check_encoder(self, enc: nn.Module) -> None:
        if self.family == "vit":
            if not isinstance(getattr(enc, "patch_drop", nn.Identity()), nn.Identity):
                raise MimlabError("SimMIM encodes all tokens: build the model with patch_drop_rate=0")
            if getattr(enc, "dynamic_img_size", False):
                raise MimlabError("SimMIM needs a fixed input size: build the model without dynamic_img_size")
        if self.family in ("vit", "beit") and self.final_norm_module(enc) is None:
            raise MimlabError(f"{type(enc).__name__} has no final norm to apply to the tokens")

    @staticmethod
    def final_norm_module(enc: nn.Module) -> nn.Module | None:
        """The per-token final norm: `norm`, or (Beit/ViT with avg pooling) `fc_norm` applied per token."""
        if not isinstance(getattr(enc, "norm", nn.Identity()), nn.Identity):
            return enc.norm
        fc = getattr(enc, "fc_norm", None)
        if fc is not None and not isinstance(fc, nn.Identity):
            return fc
        return nn.Identity()

    def no_weight_decay(self) -> set[str]:
        return wrapper_no_weight_decay(self.encoder)

    def _mask_tokens(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, L, D) or (B, H, W, D); mask (B, gh, gw): masked embeddings -> the mask token."""
        if self.family == "swin":
            w = mask.unsqueeze(-1).to(x.dtype)
            tok = self.mask_token.view(1, 1, 1, -1)
        else:
            w = mask.flatten(1).unsqueeze(-1).to(x.dtype)
            tok = self.mask_token
        return x * (1 - w) + tok.to(x.dtype) * w

    def forward_features(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encode with masking; returns the output feature map (B, out_dim, H/stride, W/stride)."""
        enc = self.encoder
        gh, gw = self.geom["token_grid"]
        if tuple(mask.shape[1:]) != (gh, gw):
            raise MimlabError(f"SimMIM mask has shape {tuple(mask.shape[1:])}, the encoder's token grid is {(gh, gw)}")
        x = enc.patch_embed(images)
        x = self._mask_tokens(x, mask)
        if self.family == "swin":
            x = enc.layers(x)
            x = enc.norm(x)                       # (B, h, w, C)
            return x.permute(0, 3, 1, 2)
        if self.family == "vit":
            x = enc._pos_embed(x)                 # prefix tokens + position embedding, after masking
            x = enc.patch_drop(x)
            x = enc.norm_pre(x)
            x = enc.blocks(x)
        else:  # beit
            x = torch.cat((enc.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
            if enc.pos_embed is not None:
                x = x + enc.pos_embed
            x = enc.pos_drop(x)
            rel = enc.rel_pos_bias() if enc.rel_pos_bias is not None else None
            for blk in enc.blocks:
                x = blk(x, shared_rel_pos_bias=rel)
        x = self.final_norm_module(enc)(x)
        x = x[:, self.geom["num_prefix_tokens"]:]
        b, n, c = x.shape
        return x.transpose(1, 2).reshape(b, c, gh, gw)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z = self.forward_features(images, mask)
        pred = self.decoder(z).float()
        p = self.geom["patch_size"]
        pixel_mask = mask.repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1)
        loss = masked_l1(pred, images.float(), pixel_mask)
        return loss, {}


def mean_colour_baseline(data: str, mask: dict[str, Any] | None, images: int = 256, seed: int = 1) -> float:
    """Masked L1 (SimMIM's loss) of predicting each masked pixel by its image's mean visible colour, on held-out
    built-in images (of `data`'s kind and seed; fractal-leaves for a folder) normalised like the model input, with
    the run's mask geometry `mask` (`MaskGeometry.describe()`). A SimMIM model that learned nothing local cannot
    beat it: the "trained enough" gate of `mimlab reproduce` divides the final loss by it."""
    import math

    import numpy as np

    from mimlab.data.images import IMAGENET_MEAN, IMAGENET_STD
    from mimlab.data.spec import parse_data_spec
    from mimlab.data.synthetic import SyntheticImages
    from mimlab.pretrain.masking import MaskGeometry, upsample

    if not mask:
        raise MimlabError("the SimMIM run recorded no mask geometry")
    h, w = mask["img_size"]
    spec = parse_data_spec(data)
    kind = spec.params.get("kind") if spec.kind == "builtin" else None
    ds = SyntheticImages(kind or "fractal-leaves", classes=16, per_class=math.ceil(images / 16), size=h,
                         seed=spec.params.get("seed", 0), offset=2_000_000)
    arr, _ = ds.to_array()
    x = torch.from_numpy(arr[:images]).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    geom = MaskGeometry(img_size=(h, w), patch_size=mask["patch_size"], mask_patch_size=mask["mask_patch_size"],
                        mask_ratio=mask["mask_ratio"])
    rng = np.random.default_rng(seed)
    tok = np.stack([geom.sample(rng) for _ in range(x.shape[0])])
    pix = torch.from_numpy(np.stack([upsample(t, geom.patch_size) for t in tok])).float()[:, None]
    visible = 1 - pix
    mean = (x * visible).sum((2, 3), keepdim=True) / visible.sum((2, 3), keepdim=True).clamp_min(1)
    return float(masked_l1(mean.expand_as(x), x, pix))
