"""Backbone adapter, layer ablation, geometry, heatmap coding, losses and parameter groups, checked by value."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from mimlab.errors import MimlabError
from mimlab.transfer.backbone import block_slots, build_backbone
from mimlab.transfer.geometry import apply, crop_matrix, warp
from mimlab.transfer.losses import center_focal_loss, giou_loss_xyxy, silog_loss
from mimlab.transfer.tasks.keypoints import decode_heatmaps, gaussian_targets

TINY = dict(img_size=16, patch_size=4, depth=3, embed_dim=32, num_heads=2)


@pytest.fixture(scope="module")
def vit():
    return build_backbone("vit_tiny_patch16_224", TINY, seed=0)


# ------------------------------------------------------------------------------------------------------ geometry
def test_crop_matrix_and_warp_agree_with_point_mapping():
    img = np.zeros((20, 30, 3), np.uint8)
    img[8:10, 11:13] = 255  # a 2x2 block centred at (12, 9)
    m = crop_matrix(center=(10, 8), size=(20, 10), out_size=(40, 20), rotation=0.3, flip=True)
    out = warp(img, m, (40, 20), fill=(0, 0, 0)).astype(float)[..., 0]
    ys, xs = np.nonzero(out)
    w = out[ys, xs]
    centroid = np.array([(xs + 0.5) @ w, (ys + 0.5) @ w]) / w.sum()
    assert centroid == pytest.approx(apply(np.linalg.inv(m), [[12, 9]])[0], abs=0.02)


def test_gaussian_and_decoding_quarter_offset():
    t = gaussian_targets(np.array([[5.3, 7.8], [2.0, 2.0]]), np.array([True, False]), (12, 10), 1.5)
    assert t.shape == (2, 10, 12) and t[1].max() == 0.0
    assert t[0, 8, 5] == pytest.approx(math.exp(-(0.3 ** 2 + 0.2 ** 2) / (2 * 1.5 ** 2)))
    coords, maxval = decode_heatmaps(t[None, :1])
    # argmax (5, 8); right neighbour higher -> +0.25, upper neighbour higher -> -0.25
    assert coords[0, 0] == pytest.approx([5.25, 7.75]) and maxval[0, 0] == pytest.approx(t[0, 8, 5])


def test_keypoint_targets_round_trip(tmp_path):
    from mimlab.transfer.datasets.coco_keypoints import find_coco_splits, flip_pairs, load_coco_keypoints
    from mimlab.data.downstream import generate
    from mimlab.transfer.tasks.keypoints import KeypointDataset
    from mimlab.transfer.tasks.options import KEYPOINTS

    generate("keypoints", tmp_path / "kp", train_images=2, val_images=1, size=48)
    ks = load_coco_keypoints(*find_coco_splits(tmp_path / "kp")["train"])
    opts = {k: v[1] for k, v in KEYPOINTS.items()}
    perm = np.arange(13)
    for a, b in flip_pairs(ks.names):
        perm[a], perm[b] = b, a
    for train in (False, True):
        ds = KeypointDataset(ks, (32, 32), (32, 32), (0.5,) * 3, (0.5,) * 3, opts, perm, train)
        for seed in range(4):
            item = ds.get(0, seed)
            inst = ks.instances[0]
            m, flip = ds.matrix(inst, np.random.default_rng(seed) if train else None)
            coords, _ = decode_heatmaps(item["target"].numpy()[None])
            want = inst.keypoints[perm if flip else np.arange(13)]
            # the keypoint in heatmap pixel-index coordinates (COCO index + 0.5 = continuous)
            uv = apply(np.linalg.inv(m), want[:, :2] + 0.5) / ds.stride - 0.5
            ok = item["weight"].numpy() > 0
            assert ok.sum() >= 10
            # argmax + quarter offset is within 0.25 heatmap pixel per axis of an exact Gaussian's centre
            assert np.abs(coords[0][ok] - uv[ok]).max() <= 0.25 + 1e-6


# ------------------------------------------------------------------------------------------------------ backbone
def test_feature_map_and_pooling_match_tokens(vit):
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        tokens = vit.model.forward_features(x)
        fmap = vit.features_map(x)
        assert fmap.shape == (2, 32, 4, 4)
        assert torch.equal(fmap[:, :, 2, 3], tokens[:, 1 + 2 * 4 + 3])
        assert torch.allclose(vit.pooled(x, "mean"), tokens[:, 1:].mean(1))
        assert torch.equal(vit.pooled(x, "cls"), tokens[:, 0])


def test_distilled_deit_prefix_tokens():
    bb = build_backbone("deit_tiny_distilled_patch16_224", TINY)
    assert bb.info.num_prefix_tokens == 2
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        tokens = bb.model.forward_features(x)
        assert torch.equal(bb.features_map(x)[:, :, 0, 0], tokens[:, 2])
        t, s = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 16, 16)
        assert bb.one_stream(t, s).shape == (1, 32, 4, 4)


def test_drop_last_blocks_equals_truncated_forward(vit):
    ref = copy.deepcopy(vit.model)
    bb = build_backbone("vit_tiny_patch16_224", TINY, seed=0, drop_last=2)
    assert len(block_slots(bb.model)) == 1 and bb.info.num_blocks == 1
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        h = ref._pos_embed(ref.patch_embed(x))
        h = ref.norm(ref.blocks[0](h))
        assert torch.allclose(bb.model.forward_features(x), h, atol=1e-6)
    with pytest.raises(MimlabError, match="at least one must stay"):
        build_backbone("vit_tiny_patch16_224", TINY, drop_last=3)


def test_reinit_last_blocks_copies_fresh_init(vit):
    bb = build_backbone("vit_tiny_patch16_224", TINY, seed=0, reinit_last=1)
    torch.manual_seed(1)  # build_backbone builds the fresh model with seed + 1
    from mimlab.models.factory import create_model

    fresh, _ = create_model("vit_tiny_patch16_224", TINY, num_classes=0)
    for k, v in bb.model.blocks[2].state_dict().items():
        assert torch.equal(v, fresh.blocks[2].state_dict()[k])
        assert not torch.equal(v, vit.model.blocks[2].state_dict()[k]) or v.ndim == 1
    for k, v in bb.model.blocks[0].state_dict().items():
        assert torch.equal(v, vit.model.blocks[0].state_dict()[k])
    with pytest.raises(MimlabError, match="separate ablations"):
        build_backbone("vit_tiny_patch16_224", TINY, drop_last=1, reinit_last=1)


def test_one_stream_embedding_and_interaction(vit):
    m = vit.model
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        # at the native grid the region embedding is timm's own patch embedding + position embedding
        assert torch.allclose(vit._embed_region(x), m._pos_embed(m.patch_embed(x))[:, 1:], atol=1e-6)
        s = torch.randn(2, 3, 16, 16)
        a = vit.one_stream(torch.randn(2, 3, 8, 8), s)
        b = vit.one_stream(torch.randn(2, 3, 8, 8), s)
        assert a.shape == (2, 32, 4, 4) and not torch.allclose(a, b)  # template tokens attend with search tokens


def test_one_stream_refuses_relative_position_models():
    bb = build_backbone("beit_base_patch16_224", dict(TINY, use_abs_pos_emb=False))
    with pytest.raises(MimlabError, match="absolute position embedding"):
        bb.check_one_stream()


def test_layer_decay_groups(vit):
    from mimlab.transfer.heads import LinearHead
    from mimlab.transfer.tasks.base import TransferModel, param_groups

    model = TransferModel(vit, LinearHead(32, 3))
    scale = {}
    for g in param_groups(model, 0.05, 0.5):
        for p in g["params"]:
            scale[id(p)] = g["lr_scale"]
    # timm's grouping: stem = layer 0, block i = layer i + 1, the final norm joins the last block; scale
    # ld^(3 - layer): stem 0.5^3, blocks 0.25, 0.5, 1, norm and head 1
    assert scale[id(vit.model.patch_embed.proj.weight)] == pytest.approx(0.5 ** 3)
    assert [scale[id(vit.model.blocks[i].attn.qkv.weight)] for i in range(3)] == pytest.approx([0.25, 0.5, 1.0])
    assert scale[id(vit.model.norm.weight)] == 1.0 and scale[id(model.head.fc.weight)] == 1.0
    assert len(scale) == sum(1 for _ in model.parameters())
    frozen = TransferModel(copy.deepcopy(vit), LinearHead(32, 3), frozen=True)
    assert sum(p.numel() for g in param_groups(frozen, 0.05, 0.5) for p in g["params"]) == 32 * 3 + 3


# -------------------------------------------------------------------------------------------------------- losses
def test_silog_by_hand():
    gt = torch.tensor([[2.0, 3.0, 5.0]])
    pred = gt * torch.tensor([[math.e, 1.0, 7.0]])
    mask = torch.tensor([[True, True, False]])
    # d = (1, 0): mean(d^2) = 0.5, mean(d)^2 = 0.25
    assert silog_loss(pred, gt, mask).item() == pytest.approx(10 * math.sqrt(0.5 - 0.85 * 0.25), rel=1e-5)


def test_giou_and_focal_by_hand():
    a, b = torch.tensor([[0.0, 0, 2, 2]]), torch.tensor([[1.0, 1, 3, 3]])
    assert giou_loss_xyxy(a, b).item() == pytest.approx(1 - (1 / 7 - 2 / 9), rel=1e-6)
    logits = torch.tensor([0.0, math.log(1 / 3)]).view(1, 1, 1, 2)  # p = 0.5, 0.25
    target = torch.tensor([1.0, 0.5]).view(1, 1, 1, 2)
    pos = math.log(0.5) * 0.5 ** 2
    neg = math.log(0.75) * 0.25 ** 2 * 0.5 ** 4
    assert center_focal_loss(logits, target).item() == pytest.approx(-(pos + neg), rel=1e-5)


def test_decode_box():
    from mimlab.transfer.tasks.track import decode_box

    g = 4
    out = {"score": torch.full((1, 1, g, g), -5.0), "size": torch.full((1, 2, g, g), 0.25),
           "offset": torch.full((1, 2, g, g), 0.5)}
    out["score"][0, 0, 1, 2] = 5.0  # row 1, column 2
    box = decode_box(out)[0]
    assert box.tolist() == pytest.approx([(2.5 / 4) - 0.125, (1.5 / 4) - 0.125, (2.5 / 4) + 0.125, (1.5 / 4) + 0.125])
