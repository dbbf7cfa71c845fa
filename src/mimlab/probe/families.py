"""Per-family adapters: which modules attend, where their tokens sit in the image, how to run the model.

The probe (`mimlab.probe.api`) is family-agnostic: it asks an adapter for
- `layers`: one `AttentionLayer` per attention module (name, stage, prefix tokens, pixel distances between the
  tokens a query sees, the uniform-attention baseline, and for window attention the windows per image);
- `capture`: how the attention logits are intercepted: `"sdpa"` (the module calls
  `F.scaled_dot_product_attention` once: `mimlab.probe.capture`) or `"softmax"` (the module computes its logits
  itself and calls `F.softmax` once on them: `mimlab.probe.capture.capture_softmax`);
- `blocks` and `tokens(output)`: the block outputs used for CKA, as (B, tokens, C) with prefix tokens first;
- `forward(x)`: the model's forward on a batch of images.

Families: timm ViT-like models (VisionTransformer, DeiT, BEiT, Eva: global attention, SDPA), timm Swin (window
attention through SDPA) and SwinV2 (scaled cosine attention and continuous position bias, computed by hand and
softmaxed with `nn.Softmax`: captured at the softmax input, which is exactly the logits), and Hugging Face models
(`mimlab.models.hf`): ViT/DeiT/BEiT/ViTMAE and Swin with eager attention (softmax capture).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from mimlab.errors import MimlabError
from mimlab.models.layout import TokenLayout, WindowGeometry, attention_modules, block_modules, inspect_layout
from mimlab.probe.capture import CaptureError, SoftmaxCall, capture_softmax  # noqa: F401 (re-exported)


@dataclass
class AttentionLayer:
    """What the statistics need about one attention module.

    Global attention (`geometry is None`): queries and keys are the whole sequence, `num_prefix` prefix tokens then
    the patch grid; `dist` (K, K) pixel distances between patches. Window attention: the attention batch is
    B * num_windows windows (image-major), no prefix; `dist` (nW, N, N) distances between the true image positions
    of each window's tokens.
    """

    name: str
    module: nn.Module
    stage: int | None
    num_prefix: int
    num_tokens: int                  # tokens per attention row (sequence length, or window area)
    dist: torch.Tensor               # float64
    uniform: float                   # distance of uniform attention (see WindowGeometry.uniform_distance_px)
    geometry: WindowGeometry | None = None

    @property
    def num_windows(self) -> int:
        return self.geometry.num_windows if self.geometry is not None else 1


# ---------------------------------------------------------------------------------------------------- adapters

@dataclass
class ModelAdapter:
    """Family-specific knowledge about one model (see the module docstring)."""

    family: str
    capture: str                                  # "sdpa" | "softmax"
    layers: list[AttentionLayer]
    blocks: list[tuple[str, nn.Module]]
    num_prefix: int                               # prefix tokens of the block outputs (CKA features)
    img_size: tuple[int, int]
    info: dict[str, Any] = field(default_factory=dict)
    forward_fn: Callable[[torch.Tensor], Any] | None = None
    tokens_fn: Callable[[Any], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> None:
        if tuple(x.shape[-2:]) != tuple(self.img_size):
            raise MimlabError(f"{self.info.get('arch', self.family)}: images are {x.shape[-2]}x{x.shape[-1]} px "
                              f"but the model was built for {self.img_size[0]}x{self.img_size[1]}")
        assert self.forward_fn is not None
        self.forward_fn(x)

    def tokens(self, output: Any) -> torch.Tensor:
        """Block output -> (B, T, C) tokens, prefix first."""
        if self.tokens_fn is not None:
            return self.tokens_fn(output)
        return output[0] if isinstance(output, (tuple, list)) else output

    def uniform_distance(self) -> float | None:
        """One model-level baseline when every layer shares it (global attention), else None (per layer)."""
        u = {round(layer.uniform, 9) for layer in self.layers}
        return self.layers[0].uniform if len(u) == 1 and self.layers[0].geometry is None else None


def vit_adapter(model: nn.Module) -> ModelAdapter:
    """timm ViT family (VisionTransformer, DeiT, BEiT, Eva...): `blocks[i].attn`, one fused SDPA call each."""
    layout: TokenLayout = inspect_layout(model)
    dist = layout.distance_matrix_px()
    uniform = layout.uniform_distance_px()
    layers = [AttentionLayer(name=n, module=m, stage=None, num_prefix=layout.num_prefix_tokens,
                             num_tokens=layout.num_tokens, dist=dist, uniform=uniform)
              for n, m in attention_modules(model)]
    return ModelAdapter(family="vit", capture="sdpa", layers=layers, blocks=block_modules(model),
                        num_prefix=layout.num_prefix_tokens, img_size=layout.img_size, info=layout.to_dict(),
                        forward_fn=model.forward_features)


def global_layers(named_attn: Sequence[tuple[str, nn.Module]], layout: TokenLayout) -> list[AttentionLayer]:
    """AttentionLayer entries for modules attending over the whole `layout` sequence."""
    dist = layout.distance_matrix_px()
    uniform = layout.uniform_distance_px()
    return [AttentionLayer(name=n, module=m, stage=None, num_prefix=layout.num_prefix_tokens,
                           num_tokens=layout.num_tokens, dist=dist, uniform=uniform) for n, m in named_attn]


def window_layer(name: str, module: nn.Module, stage: int, geom: WindowGeometry) -> AttentionLayer:
    return AttentionLayer(name=name, module=module, stage=stage, num_prefix=0, num_tokens=geom.window_area,
                          dist=geom.distance_px(), uniform=geom.uniform_distance_px(), geometry=geom)


def swin_geometry(label: str, img_size: tuple[int, int], feat: tuple[int, int], window: tuple[int, int],
                  shift: tuple[int, int]) -> WindowGeometry:
    """The geometry of one Swin block, with the one-line error for input sizes that do not fit the window grid."""
    H, W = feat
    if img_size[0] % H or img_size[1] % W:
        raise MimlabError(f"{label}: a {img_size[0]}x{img_size[1]} input does not map onto the {H}x{W} token map")
    if H % window[0] or W % window[1]:
        raise MimlabError(
            f"{label}: input size {img_size[0]}x{img_size[1]} does not fit the window grid: the {H}x{W} token map "
            f"is not a multiple of the {window[0]}x{window[1]} window (the model would pad and attend to padding); "
            f"use an input whose stage token maps are multiples of the window (e.g. patch * 2^(stages-1) * window "
            f"on each side)")
    return WindowGeometry(feat=(H, W), window=tuple(window), shift=tuple(shift),   # type: ignore[arg-type]
                          token_px=(img_size[0] / H, img_size[1] / W))


def _check_shift_mask(label: str, name: str, geom: WindowGeometry, mask: torch.Tensor | None) -> None:
    """The model's own shift mask (nW, N, N; 0 = attend, large negative = masked) must match the geometry."""
    if mask is None:
        if any(geom.shift):
            raise MimlabError(f"{label}/{name}: shifted block without an attention mask")
        return
    allowed = mask.detach().to("cpu") == 0
    if tuple(allowed.shape) != (geom.num_windows, geom.window_area, geom.window_area) or \
            not torch.equal(allowed, geom.same_region()):
        raise MimlabError(f"{label}/{name}: the model's shift mask does not match the expected Swin regions; "
                          "refusing to report distances for unknown token positions")


def _tuple2(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, (int, float)) else (int(v[0]), int(v[1]))


def swin_adapter(model: nn.Module) -> ModelAdapter:
    """timm SwinTransformer (SDPA) and SwinTransformerV2 (softmax capture): `layers[s].blocks[j].attn`.

    Window and shift are read from each block (timm clamps the window to a smaller token map); the block's own
    shift mask is checked against the geometry. Blocks output (B, H, W, C) maps, flattened to tokens for CKA.
    """
    arch = type(model).__name__
    v2 = arch == "SwinTransformerV2"
    pe = model.patch_embed
    img = _tuple2(pe.img_size)
    patch = _tuple2(pe.patch_size)
    layers: list[AttentionLayer] = []
    blocks: list[tuple[str, nn.Module]] = []
    for s, stage in enumerate(model.layers):
        for j, blk in enumerate(stage.blocks):
            name = f"layers.{s}.blocks.{j}"
            if getattr(blk, "dynamic_mask", False):
                raise MimlabError(f"{arch}: dynamic_mask=True blocks are not supported; build with the default")
            if getattr(blk, "always_partition", False):
                raise MimlabError(f"{arch}: always_partition=True is not supported; build with the default")
            geom = swin_geometry(arch, img, _tuple2(blk.input_resolution), _tuple2(blk.window_size),
                                 _tuple2(blk.shift_size))
            _check_shift_mask(arch, name, geom, getattr(blk, "attn_mask", None))
            layers.append(window_layer(name, blk.attn, s, geom))
            blocks.append((name, blk))
    first = layers[0].geometry
    assert first is not None
    info = {"num_prefix_tokens": 0, "grid": list(first.feat), "patch_size": list(patch), "img_size": list(img),
            "stages": len(model.layers),
            "windows": {layer.name: layer.geometry.to_dict() for layer in layers if layer.geometry is not None}}

    def tokens(out):
        x = out[0] if isinstance(out, (tuple, list)) else out
        return x.reshape(x.shape[0], -1, x.shape[-1])           # (B, H, W, C) -> (B, HW, C)

    return ModelAdapter(family="swin", capture="softmax" if v2 else "sdpa", layers=layers, blocks=blocks,
                        num_prefix=0, img_size=img, info=info, forward_fn=model.forward_features, tokens_fn=tokens)


def adapter_for(model: nn.Module) -> ModelAdapter:
    """Pick the adapter for a model; unsupported models get a one-line error naming the supported families."""
    name = type(model).__name__
    if name in ("SwinTransformer", "SwinTransformerV2"):
        return swin_adapter(model)
    from mimlab.models import hf

    if hf.is_hf_model(model):
        return hf.hf_adapter(model)
    if hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens") and hasattr(model, "blocks"):
        return vit_adapter(model)
    raise MimlabError(f"{name}: unsupported architecture; supported: timm VisionTransformer, DeiT (incl. "
                      "distilled), BEiT, Eva-style ViTs, SwinTransformer, SwinTransformerV2, and Hugging Face "
                      f"{', '.join(hf.SUPPORTED_TYPES)} (hf:PATH)")


def per_image_window_mean(values: torch.Tensor, num_windows: int) -> torch.Tensor:
    """(B * nW, ...) per-window values (image-major, as window_partition orders them) -> (B, ...) window means."""
    if values.shape[0] % num_windows:
        raise CaptureError(f"attention batch {values.shape[0]} is not a multiple of {num_windows} windows")
    return values.reshape(values.shape[0] // num_windows, num_windows, *values.shape[1:]).mean(1)


__all__ = ["AttentionLayer", "ModelAdapter", "SoftmaxCall", "adapter_for", "capture_softmax", "vit_adapter",
           "swin_adapter", "swin_geometry", "window_layer", "global_layers", "per_image_window_mean"]
