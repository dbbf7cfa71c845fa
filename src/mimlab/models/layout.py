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
    prefix_roles: tuple[str, ...] = ()   # one per prefix token, in order: "cls", "dist" or "register"

    def __post_init__(self) -> None:
        if self.prefix_roles and len(self.prefix_roles) != self.num_prefix_tokens:
            raise ValueError(f"{len(self.prefix_roles)} prefix roles for {self.num_prefix_tokens} prefix tokens")
        if not self.prefix_roles and self.num_prefix_tokens:      # unknown: the first is the class token
            object.__setattr__(self, "prefix_roles", ("cls",) + ("prefix",) * (self.num_prefix_tokens - 1))

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
        return {"num_prefix_tokens": self.num_prefix_tokens, "prefix_roles": list(self.prefix_roles),
                "grid": list(self.grid), "patch_size": list(self.patch_size), "img_size": list(self.img_size)}


def inspect_layout(model: nn.Module) -> TokenLayout:
    """Read the token layout of a timm ViT-family model (VisionTransformer, DeiT, BEiT, ...).

    The result is checked against the token count the attention actually sees when the probe runs.
    """
    name = type(model).__name__
    pe = getattr(model, "patch_embed", None)
    if pe is None or not hasattr(model, "num_prefix_tokens"):
        raise MimlabError(f"{name}: not a ViT-family model (needs `patch_embed` and `num_prefix_tokens`); "
                          "supported: timm VisionTransformer, DeiT (incl. distilled), BEiT, Eva-style models")
    # dynamic_img_size models (DINOv3, ...) accept any size; the probe feeds them exactly the size they were built
    # for (img_size, e.g. from --img-size), whose grid patch_embed records
    grid = getattr(pe, "grid_size", None)
    patch = getattr(pe, "patch_size", None)
    if grid is None or patch is None:
        raise MimlabError(f"{name}: patch_embed has no grid_size/patch_size")
    return TokenLayout(num_prefix_tokens=int(model.num_prefix_tokens), grid=_pair(grid), patch_size=_pair(patch),
                       prefix_roles=timm_prefix_roles(model))


def timm_prefix_roles(model: nn.Module) -> tuple[str, ...]:
    """The role of each prefix token of a timm ViT-family model, in sequence order: the class token, the
    distillation token (distilled DeiT), then the registers (timm's `reg_token`, DINOv2/DINOv3 registers)."""
    roles = ["cls"] if getattr(model, "cls_token", None) is not None else []
    if getattr(model, "dist_token", None) is not None:
        roles.append("dist")
    reg = getattr(model, "reg_token", None)
    roles += ["register"] * (int(reg.shape[1]) if reg is not None else 0)
    if len(roles) != int(model.num_prefix_tokens):      # a layout this reading does not know: say so, do not guess
        return ("cls",) + ("prefix",) * (int(model.num_prefix_tokens) - 1) if model.num_prefix_tokens else ()
    return tuple(roles)


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


# ------------------------------------------------------------------------------------------------ windowed attention

@dataclass(frozen=True)
class WindowGeometry:
    """Where the tokens of one (shifted) window-attention block sit in the input image (Swin, SwinV2).

    The block sees a `feat[0] x feat[1]` token map whose tokens cover `token_px = (th, tw)` pixels each. It rolls the
    map by `-shift` (cyclic shift: shifted[r, c] = x[(r + s0) mod H, (c + s1) mod W]), cuts it into row-major
    `window[0] x window[1]` windows (window w = wr * (W / ww) + wc; inside a window tokens are row-major) and
    attends inside each window. With a shift, a window at the border holds tokens from up to 4 regions of the image
    that are not neighbours; the model adds a large negative bias (-100 in Swin) to pairs from different regions.
    The region of a shifted coordinate r along an axis of length L is 0 for r < L - window, 1 for r < L - shift,
    else 2 (the Swin paper's masking, as in the official code and timm).
    """

    feat: tuple[int, int]
    window: tuple[int, int]
    shift: tuple[int, int]
    token_px: tuple[float, float]

    def __post_init__(self) -> None:
        (H, W), (wh, ww), (s0, s1) = self.feat, self.window, self.shift
        if wh <= 0 or ww <= 0 or H % wh or W % ww:
            raise MimlabError(f"a {H}x{W} token map does not fit {wh}x{ww} windows (each side must be a multiple)")
        if not (0 <= s0 < max(wh, 1) and 0 <= s1 < max(ww, 1)):
            raise MimlabError(f"shift {self.shift} must lie in [0, window) = [0, {self.window})")

    @property
    def num_windows(self) -> int:
        return (self.feat[0] // self.window[0]) * (self.feat[1] // self.window[1])

    @property
    def window_area(self) -> int:
        return self.window[0] * self.window[1]

    def _shifted_coords(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(nW, N) row and column of every window token in the shifted map."""
        (H, W), (wh, ww) = self.feat, self.window
        nwh, nww = H // wh, W // ww
        wr = torch.arange(nwh).repeat_interleave(nww)                 # (nW,)
        wc = torch.arange(nww).repeat(nwh)
        a = torch.arange(wh).repeat_interleave(ww)                    # (N,)
        c = torch.arange(ww).repeat(wh)
        return wr[:, None] * wh + a[None, :], wc[:, None] * ww + c[None, :]

    def true_positions(self) -> torch.Tensor:
        """(nW, N, 2) integer (row, col) of every window token in the un-shifted token map (its true position)."""
        r, c = self._shifted_coords()
        return torch.stack([(r + self.shift[0]) % self.feat[0], (c + self.shift[1]) % self.feat[1]], dim=-1)

    def regions(self) -> torch.Tensor:
        """(nW, N) region label of every window token (all 0 without a shift)."""
        r, c = self._shifted_coords()
        (H, W), (wh, ww), (s0, s1) = self.feat, self.window, self.shift

        def axis(v, L, w, s):
            return (v >= L - w).long() + (v >= L - s).long() if s else torch.zeros_like(v)

        return axis(r, H, wh, s0) * 3 + axis(c, W, ww, s1)

    def same_region(self) -> torch.Tensor:
        """(nW, N, N) bool: the pair may attend to each other (not masked by the shift)."""
        g = self.regions()
        return g[:, :, None] == g[:, None, :]

    def distance_px(self, dtype=torch.float64) -> torch.Tensor:
        """(nW, N, N) Euclidean pixel distance between the TRUE image positions of the tokens of each window
        (token centres: ((row + 0.5) * th, (col + 0.5) * tw)). Pairs from different shift regions get their true,
        large distance; their attention weight is ~e^-100 anyway."""
        pos = self.true_positions().to(dtype)
        th, tw = self.token_px
        px = torch.stack([(pos[..., 0] + 0.5) * th, (pos[..., 1] + 0.5) * tw], dim=-1)
        return torch.cdist(px, px)

    def uniform_distance_px(self) -> float:
        """Mean attention distance of uniform attention over the keys a query may attend to (its window; with a
        shift, the keys of its own region), averaged over all queries of the image: the per-window baseline."""
        d = self.distance_px()
        allowed = self.same_region().to(d.dtype)
        per_query = (d * allowed).sum(-1) / allowed.sum(-1)
        return float(per_query.mean())

    def to_dict(self) -> dict:
        return {"feat": list(self.feat), "window": list(self.window), "shift": list(self.shift),
                "token_px": list(self.token_px), "num_windows": self.num_windows}
