"""Per-family adapters (see `base`): `adapter_for(model)` picks the one for a model. To support a new family, write
an adapter function returning a `ModelAdapter` (as in `timm.py` or `hf.py`) and add its test to the family matrix
(tests/test_families.py); docs/architecture.md says where else to touch."""
from __future__ import annotations

from torch import nn

from mimlab.errors import MimlabError
from mimlab.models.hf import SUPPORTED_TYPES, is_hf_model
from mimlab.probe.families.base import (AttentionLayer, ModelAdapter, check_shift_mask, global_layers,
                                        per_image_window_mean, swin_geometry, window_layer)
from mimlab.probe.families.hf import hf_adapter
from mimlab.probe.families.timm import swin_adapter, vit_adapter


def adapter_for(model: nn.Module) -> ModelAdapter:
    """Pick the adapter for a model; unsupported models get a one-line error naming the supported families."""
    name = type(model).__name__
    if name in ("SwinTransformer", "SwinTransformerV2"):
        return swin_adapter(model)
    if is_hf_model(model):
        return hf_adapter(model)
    if hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens") and hasattr(model, "blocks"):
        return vit_adapter(model)
    raise MimlabError(f"{name}: unsupported architecture; supported: timm VisionTransformer, DeiT (incl. "
                      "distilled), BEiT, Eva-style ViTs, SwinTransformer, SwinTransformerV2, and Hugging Face "
                      f"{', '.join(SUPPORTED_TYPES)} (hf:PATH)")


__all__ = ["AttentionLayer", "ModelAdapter", "adapter_for", "check_shift_mask", "global_layers", "hf_adapter",
           "per_image_window_mean", "swin_adapter", "swin_geometry", "vit_adapter", "window_layer"]
