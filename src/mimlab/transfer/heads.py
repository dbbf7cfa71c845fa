"""Task heads on top of the backbone's pooled features or patch feature map.

- `LinearHead`: (optionally BatchNorm without affine, as in MAE's linear probe) + Linear.
- `DeconvStack`: n x [ConvTranspose2d(k=4, s=2, p=1) -> BatchNorm -> ReLU], each doubling the resolution
  (SimpleBaseline, Xiao et al. 2018; ViTPose's "classic decoder", Xu et al. 2022).
- `HeatmapHead`: DeconvStack + 1x1 conv to K heatmaps.
- `DepthHead`: DeconvStack + 3x3 conv to one channel, `max_depth * sigmoid(.)` (as in BTS/DepthFormer heads),
  bilinearly upsampled to the input size.
- `CenterBoxHead`: a light CenterNet/OSTrack-style box head on the search feature map: centre-score logits
  (1 channel), box size (2, sigmoid, as a fraction of the search region) and sub-cell centre offset (2, sigmoid).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearHead(nn.Module):
    def __init__(self, in_dim: int, num_classes: int, batchnorm: bool = False):
        super().__init__()
        self.norm = nn.BatchNorm1d(in_dim, affine=False, eps=1e-6) if batchnorm else nn.Identity()
        self.fc = nn.Linear(in_dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01 if batchnorm else 2e-5)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))


class DeconvStack(nn.Sequential):
    def __init__(self, in_ch: int, channels: int, num_deconv: int):
        layers: list[nn.Module] = []
        for i in range(num_deconv):
            layers += [nn.ConvTranspose2d(in_ch if i == 0 else channels, channels, 4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        super().__init__(*layers)
        self.out_channels = channels if num_deconv else in_ch


class HeatmapHead(nn.Module):
    """(B, C, h, w) -> (B, K, h * 2^n, w * 2^n) heatmaps."""

    def __init__(self, in_ch: int, num_keypoints: int, num_deconv: int = 2, channels: int = 64):
        super().__init__()
        self.deconv = DeconvStack(in_ch, channels, num_deconv)
        self.final = nn.Conv2d(self.deconv.out_channels, num_keypoints, 1)
        nn.init.normal_(self.final.weight, std=0.001)
        nn.init.zeros_(self.final.bias)
        self.upsample = 2 ** num_deconv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final(self.deconv(x))


class DepthHead(nn.Module):
    """(B, C, h, w) -> (B, 1, H, W) depth in metres in (0, max_depth)."""

    def __init__(self, in_ch: int, max_depth: float, num_deconv: int = 2, channels: int = 64):
        super().__init__()
        self.deconv = DeconvStack(in_ch, channels, num_deconv)
        self.final = nn.Conv2d(self.deconv.out_channels, 1, 3, padding=1)
        self.max_depth = float(max_depth)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        d = self.final(self.deconv(x))
        d = F.interpolate(d, size=size, mode="bilinear", align_corners=False)
        return self.max_depth * torch.sigmoid(d)


class CenterBoxHead(nn.Module):
    """(B, C, h, w) -> dict(score (B, 1, h, w) logits, size (B, 2, h, w) in (0, 1), offset (B, 2, h, w) in (0, 1))."""

    def __init__(self, in_ch: int, channels: int = 64):
        super().__init__()

        def branch(out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(in_ch, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(True),
                                 nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(True),
                                 nn.Conv2d(channels, out, 1))

        self.score, self.size, self.offset = branch(1), branch(2), branch(2)
        nn.init.constant_(self.score[-1].bias, -2.19)  # prior 0.1 (CenterNet)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"score": self.score(x), "size": torch.sigmoid(self.size(x)), "offset": torch.sigmoid(self.offset(x))}
