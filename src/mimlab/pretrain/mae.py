"""MAE (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022) around a timm ViT.

The encoder sees only the visible patches (prefix tokens kept): position embeddings are added to all patch
embeddings, a per-sample random shuffle keeps ``int(L * (1 - ratio))`` of them (ratio 0.75). A light decoder
(linear embed, learned mask token, fixed 2-d sin-cos position embedding, timm `Block`s, norm, linear
prediction of ``patch^2 * 3`` pixels) reconstructs every patch; the loss is the MSE against per-patch
normalised pixels (``norm_pix_loss``: ``(t - mean) / sqrt(var + 1e-6)``, unbiased var, as in the official
code) averaged over removed patches only.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from mimlab.errors import ConfigError, MimlabError
from mimlab.pretrain.masking import MAE_MASK_RATIO, gather_tokens, mae_keep_count, mae_mask, shuffle_ids


def sincos_2d(grid_h: int, grid_w: int, dim: int) -> np.ndarray:
    """Fixed 2-d sin-cos embedding (grid_h * grid_w, dim), rows in raster order (MAE / MoCo v3).

    Half the channels encode the row, half the column; for a coordinate ``p`` and ``omega_i = 10000^(-i/(D/4))``
    (``i < D/4``, D = dim): ``[sin(p * omega), cos(p * omega)]``. The column code comes first, as in MAE.
    """
    if dim % 4:
        raise MimlabError(f"decoder width {dim} must be divisible by 4 for the sin-cos position embedding")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    ys, xs = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij")

    def code(pos: np.ndarray) -> np.ndarray:
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([code(xs), code(ys)], axis=1).astype(np.float32)


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), patches in raster order, pixels (row, col, channel) inside a patch."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def norm_pix_target(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch normalisation ``(t - mean) / sqrt(var + eps)`` (unbiased variance, as the official MAE)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


def default_decoder(embed_dim: int) -> dict[str, int]:
    """MAE's 8 x 512 (16 heads) decoder for encoders of width >= 768; narrower encoders get a proportionally
    light one: width = encoder width, 2 blocks, heads of 32 channels."""
    if embed_dim >= 768:
        return {"decoder_dim": 512, "decoder_depth": 8, "decoder_heads": 16}
    dim = max(32, embed_dim - embed_dim % 4)
    return {"decoder_dim": dim, "decoder_depth": 2, "decoder_heads": max(1, dim // 32)}


class MAE(nn.Module):
    """``forward(images, noise) -> (loss, logs)``; `noise` (B, L) uniform in [0, 1) decides the shuffle."""

    def __init__(self, encoder: nn.Module, *, mask_ratio: float = MAE_MASK_RATIO, decoder_dim: int | None = None,
                 decoder_depth: int | None = None, decoder_heads: int | None = None, mlp_ratio: float = 4.0,
                 norm_pix_loss: bool = True, in_chans: int = 3):
        super().__init__()
        from timm.models.vision_transformer import Block, VisionTransformer

        if not isinstance(encoder, VisionTransformer):
            raise MimlabError(f"MAE supports timm VisionTransformer encoders (ViT, DeiT); got {type(encoder).__name__}"
                              " (its attention needs the full token grid)")
        if not isinstance(encoder.patch_drop, nn.Identity) or getattr(encoder, "dynamic_img_size", False):
            raise MimlabError("MAE: build the encoder without patch_drop_rate and dynamic_img_size")
        if not getattr(encoder.patch_embed, "flatten", True):
            raise MimlabError("MAE: the encoder's patch embedding must output tokens (B, L, D)")
        d = default_decoder(encoder.embed_dim)
        decoder_dim = decoder_dim or d["decoder_dim"]
        decoder_depth = decoder_depth or d["decoder_depth"]
        decoder_heads = decoder_heads or d["decoder_heads"]
        if decoder_dim % decoder_heads:
            raise ConfigError("decoder_dim", f"{decoder_dim} must be divisible by decoder_heads ({decoder_heads})")
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.patch_size = int(encoder.patch_embed.patch_size[0])
        self.grid = tuple(int(g) for g in encoder.patch_embed.grid_size)
        self.num_tokens = self.grid[0] * self.grid[1]
        self.num_prefix = int(encoder.num_prefix_tokens)
        self.keep = mae_keep_count(self.num_tokens, mask_ratio)
        self.decoder_config = {"decoder_dim": decoder_dim, "decoder_depth": decoder_depth,
                               "decoder_heads": decoder_heads, "mlp_ratio": mlp_ratio, "keep_tokens": self.keep,
                               "tokens": self.num_tokens, "mask_ratio": mask_ratio, "norm_pix_loss": norm_pix_loss}
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        pos = np.concatenate([np.zeros((self.num_prefix, decoder_dim), np.float32), sincos_2d(*self.grid, decoder_dim)])
        self.register_buffer("decoder_pos_embed", torch.from_numpy(pos).unsqueeze(0), persistent=False)
        self.decoder_blocks = nn.Sequential(*[Block(decoder_dim, decoder_heads, mlp_ratio=mlp_ratio, qkv_bias=True)
                                              for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size ** 2 * in_chans)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        from mimlab.pretrain.simmim import wrapper_no_weight_decay

        return wrapper_no_weight_decay(self.encoder)

    def forward_encoder(self, images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                    torch.Tensor]:
        """-> (latent (B, P + keep, D), removed-mask (B, L), ids_restore (B, L))."""
        enc = self.encoder
        if noise.shape[1] != self.num_tokens:
            raise MimlabError(f"MAE noise has {noise.shape[1]} tokens, the encoder has {self.num_tokens}")
        x = enc._pos_embed(enc.patch_embed(images))       # prefix + patches, position embedding added to all
        prefix, patches = x[:, :self.num_prefix], x[:, self.num_prefix:]
        ids_shuffle, ids_restore = shuffle_ids(noise)
        visible = gather_tokens(patches, ids_shuffle[:, :self.keep])
        x = torch.cat([prefix, visible], dim=1)
        x = enc.norm_pre(x)
        x = enc.blocks(x)
        x = enc.norm(x)
        return x, mae_mask(ids_restore, self.keep), ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """-> per-patch predictions (B, L, p*p*3) in the original (raster) order."""
        y = self.decoder_embed(latent)
        prefix, visible = y[:, :self.num_prefix], y[:, self.num_prefix:]
        b = y.shape[0]
        fill = self.mask_token.to(y.dtype).expand(b, self.num_tokens - visible.shape[1], -1)
        full = gather_tokens(torch.cat([visible, fill], dim=1), ids_restore)   # unshuffle
        y = torch.cat([prefix, full], dim=1) + self.decoder_pos_embed.to(y.dtype)
        y = self.decoder_blocks(y)
        y = self.decoder_norm(y)
        return self.decoder_pred(y[:, self.num_prefix:])

    def loss(self, images: torch.Tensor, pred: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
        target = patchify(images.float(), self.patch_size)
        if self.norm_pix_loss:
            target = norm_pix_target(target)
        per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
        return (per_patch * removed).sum() / removed.sum()

    def forward(self, images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        latent, removed, ids_restore = self.forward_encoder(images, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.loss(images, pred, removed), {}
