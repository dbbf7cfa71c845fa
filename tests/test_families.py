"""The family matrix: every model family a researcher is likely to hold, built tiny with the family's own timm (or
Hugging Face) class, saved in its release layout, loaded through `mimlab probe ARCH@CKPT` (or `hf:DIR`) with no
extra flag, and every statistic of every head and layer compared with the float64 reference computed from that very
model's explicit attention (`mimlab.probe.reference`), at 1e-5 relative in float32 on the CPU (the default
statistics path, the C kernel). Attention is sharpened (q/k weights x3) so it is peaked, not the near-uniform
attention of random initialisation. docs/checkpoints.md's support matrix names these cases.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import timm
import torch

from mimlab.cli import main
from mimlab.probe.attention_stats import METRICS
from mimlab.probe.reference import (attention_maps_float64, block_outputs_float64, reference_metrics,
                                    reference_token_norms)

TINY = dict(depth=2, embed_dim=64, num_heads=4)
VIT = dict(img_size=32, patch_size=4, **TINY)
RTOL = 1e-5


def kw_text(kwargs: dict[str, Any]) -> str:
    def one(v):
        if isinstance(v, tuple):
            return "x".join(str(int(x)) for x in v)
        return str(v)
    return ",".join(f"{k}={one(v)}" for k, v in kwargs.items())


def sharpen(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("qkv.weight", "q_proj.weight", "k_proj.weight", "query.weight", "key.weight")):
                p.mul_(3.0)
    return model


def build(arch: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return sharpen(timm.create_model(arch, pretrained=False, **kwargs)).eval()


def save_safetensors(sd: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def headless(model: torch.nn.Module, arch: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    """The same weights in a num_classes=0 model (what the reference runs; it never reads the head)."""
    ref = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs).eval()
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith(("head.", "head_dist."))}
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith(("head", "fc_norm", "norm")) for k in missing), (missing, unexpected)
    return ref


def probe_cli(spec: str, kwargs: str, x: torch.Tensor, tmp: Path, *extra: str, capsys=None) -> dict[str, Any]:
    npy = tmp / "x.npy"
    np.save(npy, x.numpy().astype(np.float32))
    out = tmp / "out"
    argv = ["probe", spec, "--data", str(npy), "--images", str(x.shape[0]), "--batch-size", str(x.shape[0]),
            "--bootstrap", "0", "--no-cka", "--no-report", "--quiet", "--workers", "0", "--out", str(out), *extra]
    if kwargs:
        argv[2:2] = ["--model-kwargs", kwargs]
    assert main(argv) == 0
    return json.loads((out / "metrics.json").read_text())


def close(got, want, what: str, rtol: float = RTOL) -> None:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = np.abs(got - want) / np.maximum(np.abs(want), 1e-6)
    assert float(err.max(initial=0.0)) <= rtol, f"{what}: relative error {float(err.max()):.2e}"


def assert_matches_reference(metrics: dict[str, Any], maps: list[np.ndarray], P: int, grid: tuple[int, int],
                             patch: tuple[int, int], outputs: list[np.ndarray] | None = None) -> None:
    """Every statistic of every head and layer; each prefix token's share of the attention and the role sums
    (class token, distillation token, registers); with `outputs`, the token norms of every block."""
    (label, m), = metrics["models"].items()
    assert m["num_prefix_tokens"] == P and tuple(m["grid"]) == tuple(grid), (m["num_prefix_tokens"], m["grid"])
    assert len(m["layers"]) == len(maps)
    roles = m["prefix_roles"]
    assert roles == {0: [], 1: ["cls"], 2: ["cls", "dist"], 5: ["cls"] + ["register"] * 4}[P], roles
    for li, (layer, a) in enumerate(zip(m["layers"], maps)):
        ref = reference_metrics(a, P, grid, patch)
        for metric in METRICS:
            if metric == "prefix_mass" and P == 0:
                assert max(layer[metric]) == 0.0
                continue
            close(layer[metric], ref[metric], f"layer {li} {metric}")
        if P:
            shares = np.asarray(layer["prefix_tokens"]["mass"])
            close(shares, ref["prefix_each"], f"layer {li} prefix shares")
            for role, metric in (("cls", "cls_mass"), ("dist", "dist_mass"), ("register", "register_mass")):
                idx = [j for j, r in enumerate(roles) if r == role]
                assert (metric in layer) == bool(idx), (metric, roles)
                if idx:
                    close(layer[metric], ref["prefix_each"][:, idx].sum(1), f"layer {li} {metric}")
        if outputs is not None:
            tn, want = layer["token_norms"], reference_token_norms(outputs[li], P)
            close([tn["patch_median"], tn["patch_max"]], [want["patch_median"], want["patch_max"]],
                  f"layer {li} token norms")
            close(tn["prefix"]["norm"], want["prefix"], f"layer {li} prefix token norms")


def images(n: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------- timm cases
# name -> fn(tmp) -> (spec, model kwargs text, extra CLI args, reference model, P, grid, patch, image size)
TimmCase = Callable[[Path], tuple]
CASES: dict[str, TimmCase] = {}


def case(name: str):
    def deco(fn: TimmCase) -> TimmCase:
        CASES[name] = fn
        return fn
    return deco


@case("vit_cls_in1k_state_dict_with_classifier")
def _vit(tmp):
    m = build("vit_tiny_patch16_224", num_classes=10, **VIT)           # a plain timm state dict, head included
    f = save_safetensors(m.state_dict(), tmp / "vit.safetensors")
    return f"m=vit_tiny_patch16_224@{f}", kw_text(VIT), (), headless(m, "vit_tiny_patch16_224", VIT), 1, (8, 8), (4, 4)


@case("vit_gap_no_cls")
def _gap(tmp):
    kw = dict(VIT, class_token=False, global_pool="avg")
    m = build("vit_tiny_patch16_224", num_classes=0, **kw)
    f = tmp / "gap.pth"
    torch.save(m.state_dict(), f)
    return f"m=vit_tiny_patch16_224@{f}", kw_text(kw), (), m, 0, (8, 8), (4, 4)


@case("siglip_attention_pool_head")
def _siglip(tmp):
    kw = dict(VIT)
    m = build("vit_base_patch16_siglip_224", num_classes=10, **kw)     # global_pool='map': attn_pool + head
    f = save_safetensors(m.state_dict(), tmp / "siglip.safetensors")
    return (f"m=vit_base_patch16_siglip_224@{f}", kw_text(kw), (), headless(m, "vit_base_patch16_siglip_224", kw), 0,
            (8, 8), (4, 4))


@case("deit_distilled_official_layout")
def _deit(tmp):
    import argparse

    m = build("deit_tiny_distilled_patch16_224", num_classes=10, **VIT)
    f = tmp / "deit.pth"           # the official release: {'model': state dict, 'args': Namespace, ...}
    torch.save({"model": m.state_dict(), "args": argparse.Namespace(model="deit_tiny_distilled_patch16_224")}, f)
    return (f"m=deit_tiny_distilled_patch16_224@{f}", kw_text(VIT), (),
            headless(m, "deit_tiny_distilled_patch16_224", VIT), 2, (8, 8), (4, 4))


@case("deit3_layerscale")
def _deit3(tmp):
    m = build("deit3_small_patch16_224", num_classes=10, **VIT)
    f = tmp / "deit3.pth"
    torch.save({"model": m.state_dict()}, f)
    return f"m=deit3_small_patch16_224@{f}", kw_text(VIT), (), headless(m, "deit3_small_patch16_224", VIT), 1, \
        (8, 8), (4, 4)


@case("simmim_official_vit_beit_shaped")
def _simmim(tmp):
    src_kw = dict(VIT, use_abs_pos_emb=False, use_shared_rel_pos_bias=True, init_values=0.1, use_fc_norm=False)
    m = build("beit_base_patch16_224", num_classes=0, **src_kw)
    sd = {f"encoder.{k}": v for k, v in m.state_dict().items() if not k.endswith("relative_position_index")}
    sd["encoder.mask_token"] = torch.zeros(1, 1, 64)
    sd["decoder.0.weight"], sd["decoder.0.bias"] = torch.randn(48, 64, 1, 1), torch.zeros(48)
    f = tmp / "simmim.pth"
    torch.save({"model": sd}, f)
    # probed as the README does: one relative position bias per layer, the shared one copied into each
    kw = dict(VIT, use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1, use_fc_norm=False)
    ref = timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=0, **kw).eval()
    table = m.rel_pos_bias.relative_position_bias_table.detach()
    sd_ref = {k: v for k, v in m.state_dict().items() if not k.startswith("rel_pos_bias.")}
    for i in range(2):
        sd_ref[f"blocks.{i}.attn.relative_position_bias_table"] = table.clone()
    ref.load_state_dict(sd_ref, strict=True)
    return f"m=beit_base_patch16_224@{f}", kw_text(kw), (), ref, 1, (8, 8), (4, 4)


@case("mae_pretrain_checkpoint")
def _mae(tmp):
    m = build("vit_tiny_patch16_224", num_classes=0, **VIT)
    sd = dict(m.state_dict())
    sd.update({"mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.randn(32, 64),
               "decoder_pos_embed": torch.zeros(1, 65, 32), "decoder_pred.weight": torch.randn(48, 32)})
    f = tmp / "mae.pth"
    torch.save({"model": sd}, f)
    return f"m=vit_tiny_patch16_224@{f}", kw_text(VIT), (), m, 1, (8, 8), (4, 4)


@case("mae_finetuned_fc_norm_and_head")
def _mae_ft(tmp):
    m = build("vit_tiny_patch16_224", num_classes=10, global_pool="avg", **VIT)    # fc_norm, no final norm
    f = tmp / "mae_ft.pth"
    torch.save({"model": m.state_dict()}, f)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **VIT).eval()
    sd = {k: v for k, v in m.state_dict().items() if not k.startswith(("head.", "fc_norm."))}
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert sorted(missing) == ["norm.bias", "norm.weight"] and not unexpected
    return f"m=vit_tiny_patch16_224@{f}", kw_text(VIT), (), ref, 1, (8, 8), (4, 4)


DINO2 = dict(img_size=56, patch_size=14, **TINY)


@case("dinov2_raw_release_resampled_to_70px")
def _dinov2(tmp):
    from timm.layers import resample_abs_pos_embed

    m = build("vit_small_patch14_dinov2", num_classes=0, init_values=1e-2, **DINO2)   # LayerScale, patch 14
    sd = dict(m.state_dict())
    sd["mask_token"] = torch.zeros(1, 64)                                # as facebookresearch/dinov2 saves it
    f = tmp / "dinov2_vits14_pretrain.pth"
    torch.save(sd, f)
    kw = dict(patch_size=14, init_values=1e-2, **TINY)          # the model's own size (518) replaced by --img-size
    ref = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=70, **kw)
    sd_ref = dict(m.state_dict())
    sd_ref["pos_embed"] = resample_abs_pos_embed(sd_ref["pos_embed"], new_size=[5, 5], old_size=[4, 4],
                                                 num_prefix_tokens=1)
    ref.load_state_dict(sd_ref, strict=True)
    return f"m=vit_small_patch14_dinov2@{f}", kw_text(kw), ("--img-size", "70"), ref.eval(), 1, (5, 5), (14, 14)


@case("dinov2_registers_raw_release")
def _dinov2_reg(tmp):
    m = build("vit_small_patch14_reg4_dinov2", num_classes=0, init_values=1e-2, **DINO2)
    sd = dict(m.state_dict())
    pos0 = torch.randn(1, 1, 64) * 0.02                 # the release keeps the class row in pos_embed ...
    raw = {k: v for k, v in sd.items() if k not in ("cls_token", "reg_token", "pos_embed")}
    raw.update({"cls_token": sd["cls_token"] - pos0, "pos_embed": torch.cat([pos0, sd["pos_embed"]], 1),
                "register_tokens": sd["reg_token"], "mask_token": torch.zeros(1, 64)})   # ... and names registers so
    f = tmp / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(raw, f)
    kw = dict(DINO2, init_values=1e-2)
    return f"m=vit_small_patch14_reg4_dinov2@{f}", kw_text(kw), (), m, 5, (4, 4), (14, 14)


@case("dinov3_rope_registers_dynamic_size")
def _dinov3(tmp):
    m = build("vit_small_patch16_dinov3", num_classes=0, img_size=64, **TINY)
    f = save_safetensors(m.state_dict(), tmp / "dinov3.safetensors")
    return f"m=vit_small_patch16_dinov3@{f}", kw_text(TINY), ("--img-size", "64"), m, 5, (4, 4), (16, 16)


@case("eva02_rope_swiglu")
def _eva02(tmp):
    kw = dict(img_size=56, **TINY)
    m = build("eva02_tiny_patch14_224", num_classes=10, **kw)
    f = save_safetensors(m.state_dict(), tmp / "eva02.safetensors")
    return f"m=eva02_tiny_patch14_224@{f}", kw_text(kw), (), headless(m, "eva02_tiny_patch14_224", kw), 1, (4, 4), \
        (14, 14)


@case("clip_timm_layout")
def _clip(tmp):
    m = build("vit_base_patch16_clip_224", num_classes=16, **VIT)
    f = save_safetensors(m.state_dict(), tmp / "clip.safetensors")
    return f"m=vit_base_patch16_clip_224@{f}", kw_text(VIT), (), headless(m, "vit_base_patch16_clip_224", VIT), 1, \
        (8, 8), (4, 4)


@case("clip_openai_release_layout")
def _clip_openai(tmp):
    m = build("vit_base_patch16_clip_224", num_classes=0, **VIT)
    sd = m.state_dict()
    v = {"visual.class_embedding": sd["cls_token"][0, 0], "visual.positional_embedding": sd["pos_embed"][0],
         "visual.conv1.weight": sd["patch_embed.proj.weight"], "visual.ln_pre.weight": sd["norm_pre.weight"],
         "visual.ln_pre.bias": sd["norm_pre.bias"], "visual.ln_post.weight": sd["norm.weight"],
         "visual.ln_post.bias": sd["norm.bias"], "visual.proj": torch.randn(64, 16)}
    names = {"norm1": "ln_1", "norm2": "ln_2", "attn.qkv.weight": "attn.in_proj_weight",
             "attn.qkv.bias": "attn.in_proj_bias", "attn.proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc",
             "mlp.fc2": "mlp.c_proj"}
    for k, t in sd.items():
        if k.startswith("blocks."):
            i, rest = k.split(".", 2)[1:]
            for a, b in names.items():
                rest = rest.replace(a, b)
            v[f"visual.transformer.resblocks.{i}.{rest}"] = t
    v["token_embedding.weight"] = torch.randn(100, 32)                  # the text tower is ignored
    v["transformer.resblocks.0.ln_1.weight"] = torch.ones(32)
    f = tmp / "ViT-B-16.pt"
    torch.save(v, f)
    return f"m=vit_base_patch16_clip_224@{f}", kw_text(VIT), (), m, 1, (8, 8), (4, 4)


IJEPA = dict(img_size=56, patch_size=14, **TINY)


@case("ijepa_target_encoder_no_cls")
def _ijepa(tmp):
    m = build("vit_huge_patch14_gap_224", num_classes=0, **IJEPA)
    other = build("vit_huge_patch14_gap_224", seed=9, num_classes=0, **IJEPA)
    f = tmp / "IN1K-vit.h.14-300e.pth.tar"
    torch.save({"encoder": {f"module.{k}": v for k, v in other.state_dict().items()},
                "predictor": {"module.predictor_embed.weight": torch.randn(8, 64)},
                "target_encoder": {f"module.{k}": v for k, v in m.state_dict().items()}, "epoch": 300}, f)
    return f"m=vit_huge_patch14_gap_224@{f}", kw_text(IJEPA), (), m, 0, (4, 4), (14, 14)


@case("dino_teacher_backbone_prefix")
def _dino(tmp):
    m = build("vit_tiny_patch16_224", num_classes=0, **VIT)
    student = build("vit_tiny_patch16_224", seed=4, num_classes=0, **VIT)
    f = tmp / "dino_deitsmall16_pretrain_full_checkpoint.pth"
    head = {"head.mlp.0.weight": torch.randn(32, 64), "head.last_layer.weight_v": torch.randn(100, 32)}
    torch.save({"student": {**{f"module.backbone.{k}": v for k, v in student.state_dict().items()},
                            **{f"module.{k}": v for k, v in head.items()}},
                "teacher": {**{f"backbone.{k}": v for k, v in m.state_dict().items()}, **head}, "epoch": 100}, f)
    return f"m=vit_tiny_patch16_224@{f}", kw_text(VIT), (), m, 1, (8, 8), (4, 4)


@case("mocov3_layout")
def _mocov3(tmp):
    m = build("vit_tiny_patch16_224", num_classes=0, **VIT)
    sd = {f"module.base_encoder.{k}": v for k, v in m.state_dict().items()}
    sd.update({"module.base_encoder.head.0.weight": torch.randn(32, 64),
               "module.predictor.0.weight": torch.randn(32, 32)})
    sd.update({f"module.momentum_encoder.{k}": torch.randn_like(v) for k, v in m.state_dict().items()})
    f = tmp / "mocov3.pth.tar"
    torch.save({"state_dict": sd, "epoch": 300}, f)
    return f"m=vit_tiny_patch16_224@{f}", kw_text(VIT), (), m, 1, (8, 8), (4, 4)


@case("non_square_input")
def _non_square(tmp):
    kw = dict(VIT, img_size=(32, 24))
    m = build("vit_tiny_patch16_224", num_classes=0, **kw)
    f = save_safetensors(m.state_dict(), tmp / "wide.safetensors")
    return f"m=vit_tiny_patch16_224@{f}", kw_text(kw), (), m, 1, (8, 6), (4, 4)


@pytest.mark.parametrize("name", list(CASES))
def test_timm_family_matches_float64_reference(name, tmp_path, capsys):
    spec, kw, extra, ref, P, grid, patch = CASES[name](tmp_path)
    x = images(4, grid[0] * patch[0], grid[1] * patch[1])
    metrics = probe_cli(spec, kw, x, tmp_path, *extra)
    maps = attention_maps_float64(ref, x)
    assert_matches_reference(metrics, maps, P, grid, patch, block_outputs_float64(ref, x))


def test_classifier_head_is_dropped_with_one_line_and_recorded(tmp_path, capsys):
    """The official DeiT layout with its classifiers probes with no flag: one line names what was dropped, and
    metrics.json records it; a backbone key that does not fit is still an error."""
    spec, kw, extra, ref, P, grid, patch = CASES["deit_distilled_official_layout"](tmp_path)
    x = images(4, 32, 32)
    metrics = probe_cli(spec, kw, x, tmp_path)
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if "dropped" in ln]
    assert len(lines) == 1 and "head.weight" in lines[0] and "head_dist.weight" in lines[0], out
    unused = metrics["models"]["m"]["checkpoint_unused"]
    assert sorted(unused["dropped"]) == ["head.bias", "head.weight", "head_dist.bias", "head_dist.weight"]
    bad = torch.load(tmp_path / "deit.pth", weights_only=False)
    bad["model"]["blocks.0.attn.qkv.weight"] = bad["model"]["blocks.0.attn.qkv.weight"][:10]
    torch.save(bad, tmp_path / "bad.pth")
    assert main(["probe", f"m=deit_tiny_distilled_patch16_224@{tmp_path / 'bad.pth'}", "--model-kwargs", kw,
                 "--data", "builtin", "--images", "4", "--batch-size", "4", "--quiet", "--no-report"]) == 2
    assert "blocks.0.attn.qkv.weight" in capsys.readouterr().err


def test_pos_embed_of_another_grid_needs_a_requested_size(tmp_path, capsys):
    """DINOv2's release is for 518 px; probed at the model's default size it is refused (never resampled
    silently), with --img-size it is resampled and recorded."""
    spec, kw, extra, ref, P, grid, patch = CASES["dinov2_raw_release_resampled_to_70px"](tmp_path)
    assert main(["probe", spec, "--model-kwargs", kw + ",img_size=70", "--data", "builtin", "--images", "4",
                 "--batch-size", "4", "--quiet", "--no-report",
                 "--out", str(tmp_path / "a")]) == 0     # img_size in the kwargs is a request too
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())["models"]["m"]
    assert m["checkpoint_resized"] == ["pos_embed 4x4 -> 5x5"] and m["img_size"] == [70, 70]
    assert main(["probe", spec, "--model-kwargs", kw, "--data", "builtin", "--images", "4",       # 518 px
                 "--batch-size", "4", "--quiet", "--no-report"]) == 2
    err = capsys.readouterr().err
    assert "4x4 grid" in err and "37x37" in err and "--img-size" in err
    assert main(["probe", spec, "--model-kwargs", kw + ",img_size=56", "--img-size", "70", "--data", "builtin",
                 "--images", "4", "--batch-size", "4", "--quiet", "--no-report"]) == 2
    assert "--img-size 70x70 contradicts img_size=56" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- Hugging Face
transformers = pytest.importorskip("transformers")
HF_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def _hf(name: str):
    T = transformers
    if name == "dinov2":
        return T.Dinov2Model(T.Dinov2Config(**HF_TINY, image_size=28, patch_size=7)), 1, (4, 4), (7, 7)
    if name == "dinov2_with_registers":
        return (T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(**HF_TINY, image_size=28, patch_size=7,
                                                                       num_register_tokens=4)), 5, (4, 4), (7, 7))
    if name == "siglip_vision_model":
        return T.SiglipVisionModel(T.SiglipVisionConfig(**HF_TINY, image_size=32, patch_size=8)), 0, (4, 4), (8, 8)
    if name == "siglip":
        text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
        return (T.SiglipModel(T.SiglipConfig(vision_config=dict(**HF_TINY, image_size=32, patch_size=8),
                                             text_config=text)), 0, (4, 4), (8, 8))
    if name == "clip_vision_model":
        return T.CLIPVisionModel(T.CLIPVisionConfig(**HF_TINY, image_size=32, patch_size=8)), 1, (4, 4), (8, 8)
    if name == "clip":
        text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
        return (T.CLIPModel(T.CLIPConfig(vision_config=dict(**HF_TINY, image_size=32, patch_size=8),
                                         text_config=text)), 1, (4, 4), (8, 8))
    if name == "data2vec-vision":
        return (T.Data2VecVisionModel(T.Data2VecVisionConfig(**HF_TINY, image_size=32, patch_size=8)), 1, (4, 4),
                (8, 8))
    if name == "ijepa":
        return T.IJepaModel(T.IJepaConfig(**HF_TINY, image_size=32, patch_size=8)), 0, (4, 4), (8, 8)
    if name == "vit_for_image_classification":
        return (T.ViTForImageClassification(T.ViTConfig(**HF_TINY, image_size=32, patch_size=8, num_labels=5)), 1,
                (4, 4), (8, 8))
    raise KeyError(name)


HF_CASES = ("dinov2", "dinov2_with_registers", "siglip_vision_model", "siglip", "clip_vision_model", "clip",
            "data2vec-vision", "ijepa", "vit_for_image_classification")


def hf_attention_maps_float64(model, directory: Path, x: torch.Tensor) -> list[np.ndarray]:
    """Explicit (eager) attention of the vision encoder in float64, as transformers returns it (the model reloaded
    from its directory with eager attention: some classes, data2vec's, are chosen when the model is built)."""
    m = type(model).from_pretrained(str(directory), attn_implementation="eager", local_files_only=True)
    m = m.double().eval()
    vision = getattr(m, "vision_model", None)
    target = vision if vision is not None and not isinstance(m, transformers.CLIPVisionModel) \
        and not isinstance(m, transformers.SiglipVisionModel) else m
    if isinstance(m, transformers.ViTForImageClassification):
        target = m.vit
    with torch.no_grad():
        out = target(pixel_values=x.double(), output_attentions=True)
    return [a.numpy() for a in out.attentions]


@pytest.mark.parametrize("name", HF_CASES)
def test_hf_family_matches_float64_reference(name, tmp_path):
    torch.manual_seed(0)
    model, P, grid, patch = _hf(name)
    sharpen(model).eval()
    model.save_pretrained(str(tmp_path / "hf"))
    x = images(4, grid[0] * patch[0], grid[1] * patch[1])
    metrics = probe_cli(f"m=hf:{tmp_path / 'hf'}", "", x, tmp_path)
    assert_matches_reference(metrics, hf_attention_maps_float64(model, tmp_path / "hf", x), P, grid, patch)
