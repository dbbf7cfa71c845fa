"""Window attention (timm Swin, SwinV2): geometry, float64 references, hand-worked cases, CKA and bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch

from mimlab.errors import MimlabError
from mimlab.models.layout import WindowGeometry
from mimlab.probe.api import ProbeConfig, probe
from mimlab.probe.attention_stats import METRICS
from mimlab.probe.families import adapter_for
from mimlab.probe.reference import (linear_cka_full_batch, reference_window_metrics, swin_attention_maps_float64,
                                    swin_window_positions)

ARCHS = {"swin": "swin_tiny_patch4_window7_224", "swinv2": "swinv2_tiny_window8_256"}
# non-square 32x64 input: stage 0 is 8x16 tokens (4 px) in 4x4 windows shifted by (2, 2); stage 1 is 4x8 tokens
# (8 px) where timm clamps the window to 4x4 and shifts only along the width: (0, 2)
SMALL = dict(img_size=(32, 64), window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), num_classes=0)


def build(kind: str, sharp: bool, **over) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(ARCHS[kind], **{**SMALL, **over}).eval()
    if sharp:   # trained models attend sharply; random init is nearly uniform
        with torch.no_grad():
            for stage in model.layers:
                for blk in stage.blocks:
                    blk.attn.qkv.weight.mul_(5.0)
                    if kind == "swin":
                        blk.attn.relative_position_bias_table.normal_(0, 1.0)
                    else:
                        blk.attn.logit_scale.fill_(math.log(40.0))
                        blk.attn.cpb_mlp[2].weight.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("sharp", [False, True], ids=["random_init", "sharp"])
@pytest.mark.parametrize("kind", list(ARCHS))
def test_windowed_metrics_match_float64_reference(kind, sharp):
    model = build(kind, sharp)
    x = torch.randn(3, 3, 32, 64, generator=torch.Generator().manual_seed(1))
    res = probe({"m": model}, x, config=ProbeConfig(batch_size=3, bootstrap=0, cka=False)).to_dict()["models"]["m"]
    assert res["family"] == "swin" and [layer["stage"] for layer in res["layers"]] == [0, 0, 1, 1]
    assert [layer["window"]["shift"] for layer in res["layers"]] == [[0, 0], [2, 2], [0, 0], [0, 2]]
    maps = swin_attention_maps_float64(model, x)
    assert len(maps) == 4
    for li, (A, blk) in enumerate(maps):
        H, W = blk.input_resolution
        pos = swin_window_positions((H, W), blk.window_size, blk.shift_size)
        allowed = np.ones((pos.shape[0], pos.shape[1], pos.shape[1]), bool) if blk.attn_mask is None else \
            blk.attn_mask.numpy() == 0
        ref = reference_window_metrics(A, pos, (32 / H, 64 / W), allowed)
        layer = res["layers"][li]
        assert layer["uniform_distance_px"] == pytest.approx(
            ref["attention_distance_px"][0] / ref["attention_distance_norm"][0], rel=1e-9)
        for metric in METRICS:
            np.testing.assert_allclose(layer[metric], ref[metric], rtol=1e-4, atol=1e-9 if not sharp else 0,
                                       err_msg=f"{kind} {layer['name']} {metric}")


@pytest.mark.parametrize("shift", [(0, 0), (2, 2), (0, 2)])
def test_true_positions_match_timm_roll_and_partition(shift):
    from timm.models.swin_transformer import window_partition

    g = WindowGeometry(feat=(8, 12), window=(4, 4), shift=shift, token_px=(4.0, 4.0))
    coords = torch.stack(torch.meshgrid(torch.arange(8), torch.arange(12), indexing="ij"), -1)[None].float()
    rolled = torch.roll(coords, shifts=(-shift[0], -shift[1]), dims=(1, 2))        # what the block does to x
    want = window_partition(rolled, (4, 4)).reshape(-1, 16, 2).long()
    assert torch.equal(g.true_positions(), want)


def test_regions_match_the_models_shift_masks():
    model = build("swin", False)
    for stage in model.layers:
        for blk in stage.blocks:
            g = WindowGeometry(tuple(blk.input_resolution), tuple(blk.window_size), tuple(blk.shift_size), (1., 1.))
            if blk.attn_mask is None:
                assert not any(blk.shift_size) and bool(g.same_region().all())
            else:
                assert torch.equal(g.same_region(), blk.attn_mask == 0)


def _content_blind(model):
    """q = 0 and no position bias: logits are the shift mask only, i.e. uniform attention in each window/region."""
    with torch.no_grad():
        for stage in model.layers:
            for blk in stage.blocks:
                d = blk.attn.qkv.weight.shape[1]
                blk.attn.qkv.weight[:d] = 0
                blk.attn.qkv.bias[:d] = 0
                blk.attn.relative_position_bias_table.zero_()
    return model


def test_uniform_window_closed_form_and_shift_regions_are_not_neighbours():
    # one stage of 4x6 tokens (4 px each, 16x24 input), 2x2 windows; block 1 is shifted by (1, 1)
    model = _content_blind(build("swin", False, img_size=(16, 24), window_size=2, depths=(2,), num_heads=(2,)))
    x = torch.randn(4, 3, 16, 24)
    res = probe({"m": model}, x, config=ProbeConfig(batch_size=4, bootstrap=0, cka=False)).to_dict()["models"]["m"]
    plain, shifted = res["layers"]
    assert plain["window"]["shift"] == [0, 0] and shifted["window"]["shift"] == [1, 1]
    # uniform attention over a 2x2 window of 4 px tokens: each query sees 0, 4, 4, 4*sqrt(2) px
    full = 2 + math.sqrt(2)
    np.testing.assert_allclose(plain["attention_distance_px"], [full, full], rtol=1e-6)
    np.testing.assert_allclose(plain["attention_distance_norm"], [1, 1], rtol=1e-6)
    np.testing.assert_allclose(plain["entropy"], [math.log(4)] * 2, rtol=1e-6)
    np.testing.assert_allclose(plain["nmi"], [0, 0], atol=1e-6)
    # shifted: the shifted map's rows 0..3 are true rows 1,2,3,0 and columns 0..5 true columns 1..5,0. Of the 6
    # windows, 2 hold one region (2+sqrt 2 px), 3 hold two regions of 2 tokens 4 px apart (2 px) and the corner
    # window holds 4 single-token regions (0 px): tokens 12-20 px apart in the image but adjacent in the window
    # never count as neighbours.
    want = (2 * full + 3 * 2 + 0) / 6
    np.testing.assert_allclose(shifted["attention_distance_px"], [want, want], rtol=1e-6)
    assert shifted["uniform_distance_px"] == pytest.approx(want, rel=1e-12)
    # the masked pairs keep their true (large) distance, never the local one
    g = WindowGeometry(feat=(4, 6), window=(2, 2), shift=(1, 1), token_px=(4.0, 4.0))
    d = g.distance_px()
    corner = g.num_windows - 1                       # window rows 2-3, columns 4-5 of the shifted map
    assert d[corner, 0, 1].item() == pytest.approx(20.0)          # true columns 5 and 0: 5 tokens
    assert d[corner, 0, 2].item() == pytest.approx(12.0)          # true rows 3 and 0: 3 tokens
    assert not bool(g.same_region()[corner].fill_diagonal_(False).any())


def test_cka_uses_flattened_block_outputs():
    model = build("swin", True)
    x = torch.randn(8, 3, 32, 64, generator=torch.Generator().manual_seed(2))
    feats = []
    hooks = [blk.register_forward_hook(lambda m, a, o: feats.append(o.detach().double().numpy()))
             for stage in model.layers for blk in stage.blocks]
    with torch.no_grad():
        model.forward_features(x)
    for h in hooks:
        h.remove()
    res = probe({"m": model}, x, config=ProbeConfig(batch_size=8, bootstrap=0)).to_dict()
    got = np.asarray(res["cka"]["m/m"])
    assert got.shape == (4, 4)
    for i in range(4):
        for j in range(4):
            assert got[i, j] == pytest.approx(linear_cka_full_batch(feats[i], feats[j]), rel=1e-6, abs=1e-9)


def test_input_size_that_does_not_fit_the_window_grid_is_a_one_line_error():
    model = timm.create_model(ARCHS["swin"], **{**SMALL, "img_size": (32, 48)})    # stage 0: 8x12 in 4x4 windows,
    with pytest.raises(MimlabError) as e:                                            # stage 1: 4x6 (clamped 4x4)
        adapter_for(model)
    msg = str(e.value)
    assert "\n" not in msg and "32x48 does not fit the window grid" in msg and "4x6" in msg


def test_wrong_image_size_at_probe_time_is_an_error():
    model = build("swinv2", False)
    with pytest.raises(MimlabError, match="built for 32x64"):
        probe({"m": model}, torch.randn(4, 3, 32, 32), config=ProbeConfig(bootstrap=0, cka=False))


def test_swinv2_attention_is_captured_at_the_softmax():
    # timm's SwinV2 computes scaled cosine attention by hand (no SDPA): the softmax capture must see every block
    model = build("swinv2", True)
    assert adapter_for(model).capture == "softmax" and adapter_for(build("swin", False)).capture == "sdpa"
    from mimlab.probe.capture import CaptureError

    blk = model.layers[0].blocks[0]
    blk.attn.softmax = torch.nn.Identity()            # a block that no longer calls softmax fails loudly
    with pytest.raises(CaptureError, match="layers.0.blocks.0"):
        probe({"m": model}, torch.randn(4, 3, 32, 64), config=ProbeConfig(bootstrap=0, cka=False))


# ------------------------------------------------------------------------ official SimMIM Swin/SwinV2 checkpoints
def _official_layout(model) -> dict:
    """A timm Swin(V2) state dict written the way the official SimMIM / Swin-Transformer code saves its encoder."""
    import re

    sd = {}
    for k, v in model.state_dict().items():
        k = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", k)
        sd["encoder." + k] = v.clone()
    for s, stage in enumerate(model.layers):
        for j, blk in enumerate(stage.blocks):
            p = f"encoder.layers.{s}.blocks.{j}."
            sd[p + "attn.relative_position_index"] = blk.attn.relative_position_index.clone()
            if blk.attn_mask is not None:
                sd[p + "attn_mask"] = blk.attn_mask.clone()
            if hasattr(blk.attn, "relative_coords_table"):
                sd[p + "attn.relative_coords_table"] = blk.attn.relative_coords_table.clone()
    sd["encoder.mask_token"] = torch.zeros(1, 1, model.embed_dim)
    sd["decoder.0.weight"] = torch.zeros(3 * 32 * 32, model.num_features, 1, 1)
    return {"model": sd}


@pytest.mark.parametrize("kind", list(ARCHS))
def test_official_simmim_swin_checkpoint_loads_strictly(kind, tmp_path):
    from mimlab.models.checkpoints import detect_format, load_checkpoint

    src = build(kind, True)
    ckpt = _official_layout(src)
    assert detect_format(ckpt["model"]) == "simmim"
    torch.save(ckpt, tmp_path / "simmim_swin.pth")
    torch.manual_seed(5)
    dst = timm.create_model(ARCHS[kind], **SMALL).eval()
    rep = load_checkpoint(dst, tmp_path / "simmim_swin.pth")
    assert rep.format == "simmim" and any("downsample" in n for n in rep.notes)
    x = torch.randn(2, 3, 32, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst.forward_features(x), src.forward_features(x))


def test_official_swin_checkpoint_with_another_pretrain_window(tmp_path):
    from mimlab.models.checkpoints import load_checkpoint

    src = build("swin", True, window_size=2)            # pretrained with 2x2 windows: 3x3 tables
    torch.save(_official_layout(src), tmp_path / "w2.pth")
    dst = timm.create_model(ARCHS["swin"], **SMALL).eval()   # fine-tune window 4: 7x7 tables
    rep = load_checkpoint(dst, tmp_path / "w2.pth")
    assert any("resized" in n and "relative position bias" in n for n in rep.notes)
    t = dst.layers[0].blocks[0].attn.relative_position_bias_table
    assert t.shape == (49, 2)
    # the centre of the resized table (relative offset 0) keeps the pretrained value
    src_t = src.layers[0].blocks[0].attn.relative_position_bias_table
    torch.testing.assert_close(t.view(7, 7, 2)[3, 3], src_t.view(3, 3, 2)[1, 1], rtol=1e-4, atol=1e-4)
    v2 = build("swinv2", True, window_size=2)
    torch.save(_official_layout(v2), tmp_path / "v2w2.pth")
    dst2 = timm.create_model(ARCHS["swinv2"], **SMALL, pretrained_window_sizes=(2, 2)).eval()
    load_checkpoint(dst2, tmp_path / "v2w2.pth")          # continuous position bias: nothing to resize
    torch.testing.assert_close(dst2.layers[0].blocks[0].attn.cpb_mlp[2].weight, v2.layers[0].blocks[0].attn.cpb_mlp[2].weight)
