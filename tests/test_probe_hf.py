"""Hugging Face models (hf:PATH): parity with timm on the same weights, ViTMAE token order, Swin, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch

transformers = pytest.importorskip("transformers", reason="transformers not installed (optional extra mimlab[hf])")

from mimlab.errors import MimlabError  # noqa: E402
from mimlab.models.hf import hf_vit_to_timm_state_dict, load_hf_model, read_config  # noqa: E402
from mimlab.probe.api import ProbeConfig, probe  # noqa: E402
from mimlab.probe.attention_stats import METRICS  # noqa: E402
from mimlab.probe.reference import reference_metrics, reference_window_metrics, swin_window_positions  # noqa: E402

VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
           patch_size=8, qkv_bias=True, layer_norm_eps=1e-6, hidden_act="gelu")
CFG = ProbeConfig(bootstrap=0, cka=True)


def _sharpen(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "query.weight", "key.weight")):
                p.mul_(4.0)
    return model


def _save(model, path):
    model.save_pretrained(str(path))
    return str(path)


def _timm_twin(hf_model):
    cfg = hf_model.config
    twin = timm.create_model("vit_tiny_patch16_224", img_size=cfg.image_size, patch_size=cfg.patch_size,
                             embed_dim=cfg.hidden_size, depth=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads,
                             mlp_ratio=cfg.intermediate_size / cfg.hidden_size, qkv_bias=True, num_classes=0).eval()
    twin.load_state_dict(hf_vit_to_timm_state_dict(hf_model), strict=True)
    return twin


def _assert_same_metrics(a, b, rtol=1e-4):
    for la, lb in zip(a["layers"], b["layers"], strict=True):
        for metric in METRICS:
            np.testing.assert_allclose(la[metric], lb[metric], rtol=rtol, atol=1e-7, err_msg=metric)


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = _sharpen(transformers.ViTModel(transformers.ViTConfig(**VIT), add_pooling_layer=False)).eval()
    return _save(model, tmp_path_factory.mktemp("hf_vit"))


def test_hf_vit_equals_timm_with_the_same_weights(vit_dir):
    hf_model, info = load_hf_model(vit_dir)
    assert info["attn_implementation"] == "eager" and hf_model.config._attn_implementation == "eager"
    twin = _timm_twin(hf_model)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():     # same function: the last hidden states agree
        torch.testing.assert_close(hf_model(pixel_values=x).last_hidden_state, twin.forward_features(x),
                                   rtol=1e-4, atol=1e-5)
    res = probe({"hf": hf_model, "timm": twin}, x, config=CFG.replace(batch_size=8)).to_dict()
    a, b = res["models"]["hf"], res["models"]["timm"]
    assert a["num_prefix_tokens"] == b["num_prefix_tokens"] == 1 and a["grid"] == b["grid"] == [4, 4]
    _assert_same_metrics(a, b)
    np.testing.assert_allclose(res["cka"]["hf/hf"], res["cka"]["timm/timm"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.diag(res["cka"]["hf/timm"]), 1.0, rtol=1e-4)


def test_hf_vit_matches_its_own_attention_maps(vit_dir):
    hf_model, _ = load_hf_model(vit_dir)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        maps = hf_model.double()(pixel_values=x.double(), output_attentions=True).attentions
    res = probe({"m": hf_model.float()}, x, config=ProbeConfig(batch_size=4, bootstrap=0, cka=False)).to_dict()
    for li, A in enumerate(maps):
        ref = reference_metrics(A.numpy(), 1, (4, 4), (8, 8))
        for metric in METRICS:
            np.testing.assert_allclose(res["models"]["m"]["layers"][li][metric], ref[metric], rtol=1e-4, atol=1e-9)


def test_vitmae_masking_disabled_identity_order_and_repeatable(tmp_path):
    torch.manual_seed(1)
    cfg = transformers.ViTMAEConfig(**VIT, mask_ratio=0.75)
    _save(_sharpen(transformers.ViTMAEModel(cfg)).eval(), tmp_path)
    model, info = load_hf_model(tmp_path)
    assert info["hf_model_type"] == "vit_mae"
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    first = probe({"m": model}, x, config=CFG.replace(batch_size=6)).to_dict()["models"]["m"]
    second = probe({"m": model}, x, config=CFG.replace(batch_size=6)).to_dict()["models"]["m"]
    for la, lb in zip(first["layers"], second["layers"]):
        for metric in METRICS:
            assert la[metric] == lb[metric]
    assert model.config.mask_ratio == 0.75          # restored after the probe
    # identity token order: the same numbers as a timm ViT with the same weights (a shuffle would move distances)
    twin = _timm_twin(model)
    _assert_same_metrics(first, probe({"t": twin}, x, config=CFG.replace(batch_size=6)).to_dict()["models"]["t"])


def test_deit_and_beit_layouts(tmp_path):
    torch.manual_seed(2)
    deit = transformers.DeiTModel(transformers.DeiTConfig(**VIT), add_pooling_layer=False)
    beit = transformers.BeitModel(transformers.BeitConfig(**{k: v for k, v in VIT.items() if k != "qkv_bias"},
                                                          use_relative_position_bias=True), add_pooling_layer=False)
    x = torch.randn(4, 3, 32, 32)
    for model, prefix in ((deit, 2), (beit, 1)):
        path = _save(model.eval(), tmp_path / model.config.model_type)
        loaded, _ = load_hf_model(path)
        with torch.no_grad():
            maps = loaded.double()(pixel_values=x.double(), output_attentions=True).attentions
        res = probe({"m": loaded.float()}, x, config=ProbeConfig(batch_size=4, bootstrap=0, cka=False)).to_dict()
        m = res["models"]["m"]
        assert m["num_prefix_tokens"] == prefix and m["grid"] == [4, 4]
        for li, A in enumerate(maps):
            ref = reference_metrics(A.numpy(), prefix, (4, 4), (8, 8))
            for metric in METRICS:
                np.testing.assert_allclose(m["layers"][li][metric], ref[metric], rtol=1e-4, atol=1e-9)


def test_hf_swin_matches_its_own_window_maps(tmp_path):
    torch.manual_seed(3)
    cfg = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                  window_size=4)
    path = _save(_sharpen(transformers.SwinModel(cfg, add_pooling_layer=False)).eval(), tmp_path)
    model, _ = load_hf_model(path)
    x = torch.randn(4, 3, 32, 32)
    blocks = [b for stage in model.encoder.layers for b in stage.blocks]
    maps = []   # the eager attention weights each SwinAttention returns (output_attentions keeps one per stage)
    hooks = [b.attention.register_forward_hook(lambda mod, a, out: maps.append(out[1].detach())) for b in blocks]
    with torch.no_grad():
        model.double()(pixel_values=x.double())
    for h in hooks:
        h.remove()
    res = probe({"m": model.float()}, x, config=ProbeConfig(batch_size=4, bootstrap=0, cka=True)).to_dict()
    m = res["models"]["m"]
    assert m["family"] == "swin" and [layer["stage"] for layer in m["layers"]] == [0, 0, 1, 1]
    for li, (A, blk) in enumerate(zip(maps, blocks, strict=True)):
        w = m["layers"][li]["window"]
        pos = swin_window_positions(w["feat"], w["window"], w["shift"])
        mask = blk.get_attn_mask(w["feat"][0], w["feat"][1], dtype=torch.float32, device=torch.device("cpu"))
        allowed = np.ones((pos.shape[0], pos.shape[1], pos.shape[1]), bool) if mask is None else mask.numpy() == 0
        ref = reference_window_metrics(A.numpy(), pos, w["token_px"], allowed)
        for metric in METRICS:
            np.testing.assert_allclose(m["layers"][li][metric], ref[metric], rtol=1e-4, atol=1e-9, err_msg=metric)
    assert m["layers"][1]["window"]["shift"] == [2, 2] and m["layers"][3]["window"]["shift"] == [0, 0]


def test_bad_hf_directories(tmp_path):
    with pytest.raises(MimlabError, match="no config.json") as e:
        read_config(tmp_path)
    assert "\n" not in str(e.value)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(MimlabError, match=r"unsupported architecture model_type='bert'.*vit, deit, beit, vit_mae, swin"):
        load_hf_model(tmp_path)
    with pytest.raises(MimlabError, match="not a directory"):
        read_config(tmp_path / "nope")


def test_hf_spec_on_the_command_line(vit_dir, tmp_path):
    from mimlab.probe.run import run_probe

    cfg = ProbeConfig(models=[f"hf:{vit_dir}"], data="builtin", images=8, batch_size=4, out=str(tmp_path / "o"),
                      workers=0, report=False, progress=False, bootstrap=0)
    result, paths = run_probe(cfg)
    (label, m), = result.models.items()
    assert label.startswith("hf:") and "/" not in label and m["hf_model_type"] == "vit" and m["grid"] == [4, 4]
    assert paths["metrics"].exists()
    with pytest.raises(MimlabError, match="load their weights from PATH"):
        run_probe(ProbeConfig(models=[f"hf:{vit_dir}@x.pth"], data="builtin", images=4, progress=False))
