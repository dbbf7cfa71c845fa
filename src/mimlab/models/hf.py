"""Hugging Face transformers vision models: loading a local `save_pretrained` directory, token layouts, conversion.

`ARCH` = `hf:PATH` on the command line: PATH is a `save_pretrained` directory (config.json + weights). Supported
`model_type`s: `SUPPORTED_TYPES` (base models; a checkpoint saved from a task model, e.g.
ViTForImageClassification, loads its backbone and the head is reported as unused; a CLIP or SigLIP two-tower
directory loads its vision tower). Attention is forced to the
"eager" implementation (the logits go through one `F.softmax`, which the probe intercepts; its adapters for these
models are in `mimlab.probe.families.hf`). Nothing is downloaded: `local_files_only=True`. transformers is an optional dependency
(`pip install mimlab[hf]`) and is imported lazily.

"""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mimlab.errors import MimlabError
from mimlab.models.layout import TokenLayout

HF_PREFIX = "hf:"
# model_type in config.json -> the transformers class of its image encoder (for `clip` and `siglip`, the vision
# tower of the two-tower model, loaded from the same directory)
_MODEL_CLASSES = {"vit": "ViTModel", "deit": "DeiTModel", "beit": "BeitModel", "vit_mae": "ViTMAEModel",
                  "swin": "SwinModel", "dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel",
                  "siglip_vision_model": "SiglipVisionModel", "siglip": "SiglipVisionModel",
                  "clip_vision_model": "CLIPVisionModel", "clip": "CLIPVisionModel",
                  "data2vec-vision": "Data2VecVisionModel", "ijepa": "IJepaModel"}
SUPPORTED_TYPES = tuple(_MODEL_CLASSES)
_POOLING_LAYER = ("vit", "deit", "beit", "swin", "data2vec-vision", "ijepa")   # built without their pooler
# prefix tokens before the patch grid (registers: config.num_register_tokens more)
_PREFIX_TOKENS = {"vit": 1, "deit": 2, "beit": 1, "vit_mae": 1, "dinov2": 1, "dinov2_with_registers": 1,
                  "siglip_vision_model": 0, "clip_vision_model": 1, "data2vec-vision": 1, "ijepa": 0}


def _transformers():
    try:
        import transformers
    except ImportError:
        raise MimlabError("hf: models need the optional dependency transformers: pip install 'mimlab[hf]'") from None
    return transformers


def is_hf_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.")


def pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, (int, float)) else (int(v[0]), int(v[1]))


def read_config(path: str | Path) -> dict[str, Any]:
    """config.json of a save_pretrained directory, with one-line errors for what is missing or unsupported."""
    p = Path(path)
    if not p.is_dir():
        raise MimlabError(f"hf:{path}: not a directory (expected a save_pretrained directory with config.json)")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise MimlabError(f"hf:{path}: no config.json in this directory (not a Hugging Face save_pretrained "
                          "directory)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise MimlabError(f"hf:{path}: cannot read config.json ({str(e).splitlines()[0]})") from None
    mt = cfg.get("model_type") if isinstance(cfg, dict) else None
    if mt not in SUPPORTED_TYPES:
        raise MimlabError(f"hf:{path}: unsupported architecture model_type={mt!r} in config.json; supported: "
                          f"{', '.join(SUPPORTED_TYPES)}")
    return cfg


def load_hf_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load the base model of a local save_pretrained directory with eager attention.

    Returns (model in eval mode, info for provenance). Weights the model needs but the directory lacks are an error
    (except the optional pooler); weights the directory has but the base model does not use (task heads,
    decoders) are reported in info["unused_keys"].
    """
    cfg = read_config(path)
    tf = _transformers()
    cls = getattr(tf, _MODEL_CLASSES[cfg["model_type"]])
    kwargs: dict[str, Any] = {}
    if cfg["model_type"] in _POOLING_LAYER:
        kwargs["add_pooling_layer"] = False
    log = tf.utils.logging
    verbosity, bars = log.get_verbosity(), log.is_progress_bar_enabled()
    log.set_verbosity_error()               # its load table of unused keys: mimlab says it in one line instead
    log.disable_progress_bar()
    from mimlab.utils.io import no_pickle_warning

    try:
        with no_pickle_warning():
            model, loading = cls.from_pretrained(str(path), attn_implementation="eager", local_files_only=True,
                                                 output_loading_info=True, **kwargs)
    except pickle.UnpicklingError as e:   # transformers loads .bin files with weights_only=True: refused, not run
        bins = ", ".join(sorted(p.name for p in Path(path).glob("*.bin"))) or "a pickle file"
        why = re.sub(r"\x1b\[[0-9;]*m", "", str(e).strip().splitlines()[0])[:200]    # torch's bold escapes
        raise MimlabError(f"hf:{path}: refusing {bins}: not a weights-only checkpoint, loading it would run code "
                          f"({why}); convert it to safetensors where you trust it") from None
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        raise MimlabError(f"hf:{path}: cannot load {cls.__name__}: {str(e).strip().splitlines()[0]}") from None
    finally:
        log.set_verbosity(verbosity)
        if bars:
            log.enable_progress_bar()
    missing = sorted(k for k in loading.get("missing_keys", []) if not k.startswith(("pooler.", "head.")))
    if missing:
        shown = ", ".join(missing[:10]) + (f", ... (+{len(missing) - 10} more)" if len(missing) > 10 else "")
        raise MimlabError(f"hf:{path}: {len(missing)} weights of {cls.__name__} are not in the directory: {shown}")
    mismatched = loading.get("mismatched_keys", [])
    if mismatched:
        raise MimlabError(f"hf:{path}: shape mismatches: {mismatched[:5]}")
    force_eager(model)
    info = {"hf_model_type": cfg["model_type"], "hf_class": cls.__name__,
            "unused_keys": sorted(loading.get("unexpected_keys", [])), "attn_implementation": "eager"}
    return model.eval(), info


def force_eager(model: nn.Module) -> None:
    """Switch a transformers model to eager attention (one softmax over explicit logits)."""
    setter = getattr(model, "set_attn_implementation", None)
    if callable(setter):
        try:
            setter("eager")
        except (ValueError, TypeError):
            pass
    if getattr(model.config, "_attn_implementation", "eager") != "eager":
        model.config._attn_implementation = "eager"
    if getattr(model.config, "_attn_implementation", "eager") != "eager":
        raise MimlabError(f"{type(model).__name__}: cannot switch attention to 'eager'")


def base_model(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", model)
    return base if isinstance(base, nn.Module) else model


def attention_of(layer: nn.Module) -> nn.Module:
    """A transformer layer's attention module (`attention` in ViT-like models, `self_attn` in CLIP and SigLIP)."""
    att = getattr(layer, "attention", None) or getattr(layer, "self_attn", None)
    if att is None:
        raise MimlabError(f"{type(layer).__name__}: no `attention` or `self_attn` module")
    return att


def layer_list(base: nn.Module) -> nn.ModuleList:
    """The transformer layers of a ViT-like HF model (transformers 5: `layers`; 4.x: `encoder.layer`; CLIP and
    SigLIP: `encoder.layers` under `vision_model`)."""
    for path in ("layers", "encoder.layer", "encoder.layers", "vision_model.encoder.layers"):
        obj: Any = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList) and len(obj) and (hasattr(obj[0], "attention")
                                                            or hasattr(obj[0], "self_attn")):
            return obj
    raise MimlabError(f"{type(base).__name__}: cannot find its transformer layers (layers / encoder.layer)")


def token_layout(model: nn.Module, image_size: tuple[int, int] | None = None) -> TokenLayout:
    """Prefix tokens + patch grid of a ViT-like HF model, from its config (at `image_size`, default the config's)."""
    cfg = model.config
    mt = cfg.model_type
    if mt not in _PREFIX_TOKENS:
        raise MimlabError(f"{type(model).__name__}: model_type {mt!r} has no ViT token layout")
    img, patch = pair(image_size if image_size is not None else cfg.image_size), pair(cfg.patch_size)
    if img[0] % patch[0] or img[1] % patch[1]:
        raise MimlabError(f"{type(model).__name__}: image_size {img} is not a multiple of patch_size {patch}")
    roles = ("cls", "dist")[:_PREFIX_TOKENS[mt]] + ("register",) * int(getattr(cfg, "num_register_tokens", 0) or 0)
    return TokenLayout(num_prefix_tokens=len(roles), grid=(img[0] // patch[0], img[1] // patch[1]), patch_size=patch,
                       prefix_roles=roles)


# ---------------------------------------------------------------------------------------- weights for timm parity

def _linear(mod: nn.Module, *names: str) -> nn.Linear:
    for n in names:
        obj: Any = mod
        for part in n.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.Linear):
            return obj
    raise MimlabError(f"{type(mod).__name__}: none of {', '.join(names)} is a Linear layer")


def hf_vit_to_timm_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict for timm `VisionTransformer` (class token, absolute pos_embed, fused qkv) from a HF ViT/ViTMAE
    model (transformers 5 names `q_proj/k_proj/v_proj/o_proj`, `mlp.fc1/fc2`; 4.x names `attention.attention.query`
    ..., `intermediate.dense`, `output.dense`). Build the timm model with the HF config's sizes, `qkv_bias`
    = config.qkv_bias and LayerNorm eps = config.layer_norm_eps (timm's default is 1e-6, HF ViT's 1e-12)."""
    base = base_model(model)
    emb = base.embeddings
    sd: dict[str, torch.Tensor] = {
        "cls_token": emb.cls_token, "pos_embed": emb.position_embeddings,
        "patch_embed.proj.weight": emb.patch_embeddings.projection.weight,
        "patch_embed.proj.bias": emb.patch_embeddings.projection.bias,
    }
    for i, layer in enumerate(layer_list(base)):
        att = layer.attention
        q = _linear(att, "q_proj", "attention.query")
        k = _linear(att, "k_proj", "attention.key")
        v = _linear(att, "v_proj", "attention.value")
        o = _linear(att, "o_proj", "output.dense")
        fc1 = _linear(layer, "mlp.fc1", "intermediate.dense")
        fc2 = _linear(layer, "mlp.fc2", "output.dense")
        p = f"blocks.{i}."
        sd[p + "norm1.weight"], sd[p + "norm1.bias"] = layer.layernorm_before.weight, layer.layernorm_before.bias
        sd[p + "norm2.weight"], sd[p + "norm2.bias"] = layer.layernorm_after.weight, layer.layernorm_after.bias
        sd[p + "attn.qkv.weight"] = torch.cat([q.weight, k.weight, v.weight], 0)
        if q.bias is not None:
            sd[p + "attn.qkv.bias"] = torch.cat([q.bias, k.bias, v.bias], 0)
        sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"] = o.weight, o.bias
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = fc1.weight, fc1.bias
        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = fc2.weight, fc2.bias
    sd["norm.weight"], sd["norm.bias"] = base.layernorm.weight, base.layernorm.bias
    return {k: v.detach().clone() for k, v in sd.items()}
