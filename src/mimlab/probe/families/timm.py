"""Adapters for timm models: ViT-like (VisionTransformer, DeiT, BEiT, Eva: global attention through SDPA), Swin
(window attention through SDPA) and SwinV2 (scaled cosine attention and continuous position bias, computed by hand
and softmaxed with `nn.Softmax`: captured at the softmax input, which is exactly the logits)."""
from __future__ import annotations

from torch import nn

from mimlab.errors import MimlabError
from mimlab.models.layout import TokenLayout, attention_modules, block_modules, inspect_layout
from mimlab.probe.families.base import (AttentionLayer, ModelAdapter, check_shift_mask, global_layers,
                                        swin_geometry, window_layer)


def vit_adapter(model: nn.Module) -> ModelAdapter:
    """timm ViT family (VisionTransformer, DeiT, BEiT, Eva...): `blocks[i].attn`, one fused SDPA call each."""
    layout: TokenLayout = inspect_layout(model)
    return ModelAdapter(family="vit", capture="sdpa", layers=global_layers(attention_modules(model), layout),
                        blocks=block_modules(model), num_prefix=layout.num_prefix_tokens, img_size=layout.img_size,
                        info=layout.to_dict(), forward_fn=model.forward_features)


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
            check_shift_mask(arch, name, geom, getattr(blk, "attn_mask", None))
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
