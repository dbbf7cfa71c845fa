"""Token layout of a ViT-family model: prefix tokens, patch grid, patch size — inspected, never assumed."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mimlab.errors import MimlabError


def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(x) for x in v)
    if len(t) != 2:
        raise ValueError(f"expected an int or a pair, got {v!r}")
    return t  # type: ignore[return-value]


@dataclass(frozen=True)
class TokenLayout:
    """`num_prefix_tokens` tokens (CLS, distillation, registers; may be 0) followed by a row-major
    `grid[0] x grid[1]` grid of patch tokens of `patch_size = (ph, pw)` pixels."""

    num_prefix_tokens: int
    grid: tuple[int, int]
    patch_size: tuple[int, int]

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches

    @property
    def img_size(self) -> tuple[int, int]:
        return (self.grid[0] * self.patch_size[0], self.grid[1] * self.patch_size[1])

    def patch_centers_px(self, dtype=torch.float64) -> torch.Tensor:
        """(num_patches, 2) pixel coordinates (y, x) of patch centres, row-major."""
        gh, gw = self.grid
        ph, pw = self.patch_size
        ys = (torch.arange(gh, dtype=dtype) + 0.5) * ph
        xs = (torch.arange(gw, dtype=dtype) + 0.5) * pw
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack([yy.reshape(-1), xx.reshape(-1)], dim=1)

    def distance_matrix_px(self, dtype=torch.float64) -> torch.Tensor:
        """D[i, j] = Euclidean distance in pixels between the centres of patches i and j."""
        c = self.patch_centers_px(dtype)
        return torch.cdist(c, c)

    def uniform_distance_px(self) -> float:
        """Mean attention distance of uniform attention over all patches: mean of D over all (i, j)."""
        return float(self.distance_matrix_px().mean())

    def to_dict(self) -> dict:
        return {"num_prefix_tokens": self.num_prefix_tokens, "grid": list(self.grid),
                "patch_size": list(self.patch_size), "img_size": list(self.img_size)}


def inspect_layout(model: nn.Module) -> TokenLayout:
    """Read the token layout of a timm ViT-family model (VisionTransformer, DeiT, BEiT, ...).

    The result is checked against the token count the attention actually sees when the probe runs.
    """
    name = type(model).__name__
    pe = getattr(model, "patch_embed", None)
    if pe is None or not hasattr(model, "num_prefix_tokens"):
        raise MimlabError(f"{name}: not a ViT-family model (needs `patch_embed` and `num_prefix_tokens`); "
                          "supported: timm VisionTransformer, DeiT (incl. distilled), BEiT, Eva-style models")
    if getattr(model, "dynamic_img_size", False):
        raise MimlabError(f"{name}: dynamic_img_size=True models are probed at a fixed size; "
                          "build it with dynamic_img_size=False and the img_size you want")
    grid = getattr(pe, "grid_size", None)
    patch = getattr(pe, "patch_size", None)
    if grid is None or patch is None:
        raise MimlabError(f"{name}: patch_embed has no grid_size/patch_size")
    return TokenLayout(num_prefix_tokens=int(model.num_prefix_tokens), grid=_pair(grid), patch_size=_pair(patch))


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The self-attention module of every transformer block, in depth order: `[("blocks.0", blocks[0].attn), ...]`."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise MimlabError(f"{type(model).__name__}: no `blocks` to probe")
    out = []
    for i, blk in enumerate(blocks):
        attn = getattr(blk, "attn", None)
        if attn is None:
            raise MimlabError(f"{type(model).__name__}: blocks.{i} has no `attn` module")
        out.append((f"blocks.{i}", attn))
    return out


def block_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every transformer block (its output is the residual stream used for CKA), in depth order."""
    return [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]
