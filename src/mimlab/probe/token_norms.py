"""Norms of the tokens a block outputs: the high-norm "artifact" tokens of Darcet et al. (2024, "Vision Transformers
Need Registers") and what the registers hold.

Per image and block, with n_t = ||x_t||_2 the norm of output token t (the residual stream, float64):
- `patch_median`, `patch_max`: the median (the lower middle value for an even count, as `torch.median`) and the
  largest norm over the patch tokens;
- `outliers`: the patch tokens whose norm exceeds k x that image's median patch norm (`k`, default 3), counted, and
  where they are: `outlier_map` holds, per grid position, the fraction of images in which that token is one;
- `prefix`: each prefix token's norm (class token, distillation token, registers), in sequence order.
Every value is averaged over the images. Darcet et al. mark DINOv2 ViT-g tokens of norm > 150 as high-norm, most patch
tokens lying far below (their Fig. 3); an absolute cutoff belongs to one model's width and training, so this module
compares each token with its own image's median patch norm instead. k is `ProbeConfig.norm_outlier_k`.
"""
from __future__ import annotations

from typing import Any

import torch


class TokenNormStats:
    """Streaming per-block sums over images (see the module docstring)."""

    def __init__(self, num_prefix: int, grid: tuple[int, int], k: float):
        self.P, self.grid, self.k = int(num_prefix), (int(grid[0]), int(grid[1])), float(k)
        K = self.grid[0] * self.grid[1]
        self.n = 0
        self.median = 0.0
        self.max = 0.0
        self.count = 0.0
        self.map = torch.zeros(K, dtype=torch.float64)
        self.prefix = torch.zeros(self.P, dtype=torch.float64)

    def update(self, tokens: torch.Tensor) -> None:
        """tokens: (B, P + gh * gw, C), prefix tokens first."""
        norms = tokens.detach().to(torch.float64).norm(dim=-1).cpu()          # (B, T)
        patch = norms[:, self.P:]
        if patch.shape[1] != self.map.numel():
            raise ValueError(f"{patch.shape[1]} patch tokens for a {self.grid[0]}x{self.grid[1]} grid")
        med = patch.median(dim=1).values
        out = patch > self.k * med[:, None]
        self.n += norms.shape[0]
        self.median += float(med.sum())
        self.max += float(patch.amax(1).sum())
        self.count += float(out.sum())
        self.map += out.sum(0).to(torch.float64)
        self.prefix += norms[:, :self.P].sum(0)

    def to_dict(self, roles: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
        n = max(self.n, 1)
        gh, gw = self.grid
        return {"patch_median": self.median / n, "patch_max": self.max / n, "outlier_k": self.k,
                "outliers_per_image": self.count / n,
                "outlier_map": (self.map / n).reshape(gh, gw).tolist(),
                "prefix": {"roles": list(roles), "norm": (self.prefix / n).tolist()}}
