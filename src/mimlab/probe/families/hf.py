"""Adapters for Hugging Face transformers models (`hf:DIR`, loaded by `mimlab.models.hf`): ViT, DeiT, BEiT, ViTMAE,
DINOv2 (with registers), SigLIP and CLIP vision towers, data2vec-vision, I-JEPA (global attention) and Swin (window
attention), all with eager attention, captured at their one softmax.

Input size: the config's `image_size`, or `model.mimlab_input_size` (set by `mimlab.probe.run` for `--img-size`),
fed with `interpolate_pos_encoding=True` where the model's forward takes it (DINOv2 interpolates by itself).

ViTMAE: its embedding randomly shuffles and drops tokens. The probe sets `mask_ratio = 0` for its forward and passes
`noise = arange(L)` so that the shuffle is the identity, then checks the returned `ids_restore` and `mask` (a
CaptureError if the token order is not the identity or any token is masked).
"""
from __future__ import annotations

import torch
from torch import nn

from mimlab.errors import MimlabError
from mimlab.models.hf import SUPPORTED_TYPES, attention_of, base_model, force_eager, layer_list, pair, token_layout
from mimlab.probe.capture import CaptureError
from mimlab.probe.families.base import ModelAdapter, check_shift_mask, global_layers, swin_geometry, window_layer


def hf_adapter(model: nn.Module):
    """The probe adapter for a supported HF model (see `mimlab.probe.families`)."""
    base = base_model(model)
    mt = getattr(base.config, "model_type", None)
    if mt not in SUPPORTED_TYPES:
        raise MimlabError(f"{type(model).__name__}: unsupported Hugging Face model_type {mt!r}; supported: "
                          f"{', '.join(SUPPORTED_TYPES)}")
    force_eager(base)
    if mt == "swin":
        return _swin_adapter(base)
    size = getattr(model, "mimlab_input_size", None)
    layout = token_layout(base, size)
    layers = layer_list(base)
    named = [(f"layers.{i}", attention_of(layer)) for i, layer in enumerate(layers)]
    blocks = [(f"layers.{i}", layer) for i, layer in enumerate(layers)]
    if mt == "vit_mae":
        if size is not None:
            raise MimlabError("hf vit_mae: probed at its config's image_size only (no interpolate_pos_encoding)")
        forward = _vitmae_forward(base)
    else:
        forward = _plain_forward(base, interpolate=size is not None and tuple(size) != pair(base.config.image_size))
    info = {**layout.to_dict(), "hf_model_type": mt}
    return ModelAdapter(family="vit", capture="softmax", layers=global_layers(named, layout), blocks=blocks,
                        num_prefix=layout.num_prefix_tokens, img_size=layout.img_size, info=info, forward_fn=forward)


def _plain_forward(base: nn.Module, interpolate: bool):
    """base(pixel_values=x), with interpolate_pos_encoding=True for another input size than the config's."""
    import inspect

    if interpolate and "interpolate_pos_encoding" in inspect.signature(base.forward).parameters:
        return lambda x: base(pixel_values=x, interpolate_pos_encoding=True)
    if interpolate and base.config.model_type not in ("dinov2", "dinov2_with_registers"):
        raise MimlabError(f"hf {base.config.model_type}: cannot be probed at another size than its image_size "
                          f"{base.config.image_size} (its forward takes no interpolate_pos_encoding)")
    return lambda x: base(pixel_values=x)


def _vitmae_forward(base: nn.Module):
    """ViTMAE forward with masking disabled and the identity token order, verified on every batch."""
    def forward(x: torch.Tensor) -> None:
        seen: dict[str, torch.Tensor] = {}

        def grab(module, args, output):
            seen["mask"], seen["ids_restore"] = output[1], output[2]

        L = base.embeddings.patch_embeddings.num_patches
        noise = torch.arange(L, device=x.device, dtype=torch.float32).expand(x.shape[0], L)
        old = base.config.mask_ratio
        base.config.mask_ratio = 0.0
        handle = base.embeddings.register_forward_hook(grab)
        try:
            base(pixel_values=x, noise=noise)
        finally:
            handle.remove()
            base.config.mask_ratio = old
        ids = seen.get("ids_restore")
        if ids is None or not torch.equal(ids.cpu(), torch.arange(L).expand(x.shape[0], L)) or \
                bool(seen["mask"].any()):
            raise CaptureError("ViTMAE: the token order after the embedding is not the identity or tokens are "
                               "masked; cannot place tokens on the patch grid")
    return forward


def _swin_adapter(base: nn.Module):
    """HF SwinModel: `encoder.layers[s].blocks[j].attention`; window clamped like HF (window = min(feature map)
    and no shift when the map is not larger than the window); the block's own shift mask is checked."""
    cfg = base.config
    img, patch = pair(cfg.image_size), pair(cfg.patch_size)
    label = f"hf swin ({type(base).__name__})"
    layers, blocks = [], []
    for s, stage in enumerate(base.encoder.layers):
        for j, blk in enumerate(stage.blocks):
            name = f"layers.{s}.blocks.{j}"
            feat = pair(blk.input_resolution)
            win, shift = int(blk.window_size), int(blk.shift_size)
            if min(feat) <= win:
                win, shift = min(feat), 0
            geom = swin_geometry(label, img, feat, (win, win), (shift, shift))
            blk.set_shift_and_window_size(feat)
            mask = blk.get_attn_mask(feat[0], feat[1], dtype=torch.float32, device=torch.device("cpu"))
            check_shift_mask(label, name, geom, mask)
            layers.append(window_layer(name, blk.attention, s, geom))
            blocks.append((name, blk))
    first = layers[0].geometry
    info = {"num_prefix_tokens": 0, "grid": list(first.feat), "patch_size": list(patch), "img_size": list(img),
            "stages": len(base.encoder.layers), "hf_model_type": "swin",
            "windows": {layer.name: layer.geometry.to_dict() for layer in layers}}
    return ModelAdapter(family="swin", capture="softmax", layers=layers, blocks=blocks, num_prefix=0, img_size=img,
                        info=info, forward_fn=lambda x: base(pixel_values=x))
