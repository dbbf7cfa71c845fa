"""SimMIM block masks, mask geometry for small inputs, AvgDist, MAE shuffles."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mimlab.errors import MimlabError
from mimlab.pretrain.masking import (MaskGeometry, avg_dist, choose_mask_patch_size, distance_to_visible,
                                     expected_avg_dist, gather_tokens, mae_keep_count, mae_mask, shuffle_ids,
                                     upsample)


@pytest.mark.parametrize("img,patch,cells,count", [(224, 16, 49, 30), (192, 4, 36, 22), (32, 4, 64, 39)])
def test_block_mask_has_exact_count_and_block_structure(img, patch, cells, count):
    geom = MaskGeometry((img, img), patch, choose_mask_patch_size(img, patch), 0.6)
    assert geom.num_cells == cells and geom.num_masked == count == math.ceil(0.6 * cells)
    rng = np.random.default_rng(0)
    s = geom.scale
    masks = [geom.sample(rng) for _ in range(20)]
    for m in masks:
        assert m.shape == geom.token_grid and m.dtype == np.uint8
        cell = m[::s, ::s]
        assert int(cell.sum()) == count                      # exact count of masked cells
        assert np.array_equal(upsample(cell, s), m)          # every cell is all-masked or all-visible
    assert len({m.tobytes() for m in masks}) == 20           # a new mask per sample


def test_block_mask_is_uniform_over_cells():
    geom = MaskGeometry((64, 64), 8, 16, 0.6)  # 4x4 cells, 10 masked
    rng = np.random.default_rng(1)
    freq = np.mean([geom.sample(rng)[::2, ::2] for _ in range(4000)], axis=0)
    assert np.allclose(freq, 10 / 16, atol=0.03)


def test_mask_patch_size_follows_the_official_geometry_and_scales_down():
    assert choose_mask_patch_size(224, 16) == 32     # ViT-B/16 at 224: 7x7 cells
    assert choose_mask_patch_size(192, 4) == 32      # Swin patch 4 at 192: 6x6 cells
    assert choose_mask_patch_size(32, 4) == 4        # 32 * 32/224 = 4.6 -> 4 (never below the patch)
    assert choose_mask_patch_size(64, 4) == 8
    assert choose_mask_patch_size(96, 16) == 16
    assert choose_mask_patch_size(16, 8) == 8
    with pytest.raises(MimlabError, match="multiple of the patch size"):
        choose_mask_patch_size(30, 4)
    with pytest.raises(MimlabError, match="multiple of the model's patch size"):
        MaskGeometry((32, 32), 4, 6, 0.6)


def test_distance_to_visible_hand_cases_and_brute_force():
    m = np.zeros((5, 5), bool)
    m[1:4, 1:4] = True                                  # 3x3 masked block in a visible frame
    d = distance_to_visible(m)
    assert d[2, 2] == 2.0 and d[1, 1] == 1.0 and d[1, 2] == 1.0 and d[0, 0] == 0.0
    assert avg_dist(m) == pytest.approx((8 * 1 + 2) / 9)
    m2 = np.ones((1, 6), bool)
    m2[0, 0] = False                                    # one visible pixel at the left end
    assert avg_dist(m2) == pytest.approx(np.mean([1, 2, 3, 4, 5]))
    m3 = np.ones((4, 4), bool)
    m3[0, 0] = False                                    # diagonal distances are Euclidean
    assert distance_to_visible(m3)[3, 3] == pytest.approx(math.sqrt(18))
    rng = np.random.default_rng(0)
    for _ in range(5):
        m = rng.random((9, 13)) < 0.7
        m[rng.integers(9), rng.integers(13)] = False
        vis = np.argwhere(~m)
        brute = np.array([[np.min(np.hypot(*(vis - [y, x]).T)) for x in range(13)] for y in range(9)])
        assert np.allclose(distance_to_visible(m), brute)
    with pytest.raises(MimlabError, match="every pixel"):
        distance_to_visible(np.ones((3, 3), bool))


def test_default_simmim_masking_avgdist_is_about_15px():
    # SimMIM paper: the default (32 px cells, ratio 0.6) at 224 has AvgDist ~15 px, inside the 10-20 sweet spot
    geom = MaskGeometry((224, 224), 16, 32, 0.6)
    assert 13.5 < expected_avg_dist(geom, samples=24) < 16.5
    # the scaled small-input default keeps the same distance relative to the image side (15/224 * 32 = 2.1 px)
    small = MaskGeometry((32, 32), 4, 4, 0.6)
    assert 1.8 < expected_avg_dist(small, samples=100) < 2.8
    assert small.describe(avg_dist_samples=8)["masked_cells"] == 39


def test_mae_shuffle_unshuffle_and_mask():
    torch.manual_seed(0)
    b, n, d = 3, 16, 5
    x = torch.randn(b, n, d)
    noise = torch.rand(b, n)
    ids_shuffle, ids_restore = shuffle_ids(noise)
    shuffled = gather_tokens(x, ids_shuffle)
    assert torch.equal(gather_tokens(shuffled, ids_restore), x)          # exact round trip
    keep = mae_keep_count(n, 0.75)
    assert keep == 4 and mae_keep_count(196, 0.75) == 49
    removed = mae_mask(ids_restore, keep)
    for i in range(b):
        kept = torch.argsort(noise[i])[:keep]                             # lowest noise is kept
        assert torch.equal(removed[i].nonzero().flatten(),
                           torch.tensor(sorted(set(range(n)) - set(kept.tolist()))))
    assert removed.sum(1).tolist() == [n - keep] * b
