"""What the probe needs to know about one model: its attention layers, where their tokens sit, how to run it.

The probe (`mimlab.probe.api`) is family-agnostic: it asks a `ModelAdapter` for
- `layers`: one `AttentionLayer` per attention module (name, stage, prefix tokens, pixel distances between the
  tokens a query sees, the uniform-attention baseline, and for window attention the windows per image);
- `capture`: how the attention logits are intercepted: `"sdpa"` (the module calls
  `F.scaled_dot_product_attention` once: `mimlab.probe.capture`) or `"softmax"` (the module computes its logits
  itself and calls `F.softmax` once on them: `mimlab.probe.capture.capture_softmax`);
- `blocks` and `tokens(output)`: the block outputs used for CKA, as (B, tokens, C) with prefix tokens first;
- `forward(x)`: the model's forward on a batch of images.
Adapters for each family live beside this module (`timm.py`, `hf.py`); `mimlab.probe.families.adapter_for` picks one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from mimlab.errors import MimlabError
from mimlab.models.layout import TokenLayout, WindowGeometry
from mimlab.probe.capture import CaptureError


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


def check_shift_mask(label: str, name: str, geom: WindowGeometry, mask: torch.Tensor | None) -> None:
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


def per_image_window_mean(values: torch.Tensor, num_windows: int) -> torch.Tensor:
    """(B * nW, ...) per-window values (image-major, as window_partition orders them) -> (B, ...) window means."""
    if values.shape[0] % num_windows:
        raise CaptureError(f"attention batch {values.shape[0]} is not a multiple of {num_windows} windows")
    return values.reshape(values.shape[0] // num_windows, num_windows, *values.shape[1:]).mean(1)
