"""Pretraining data: --data parsing, the seeded crop, determinism of items, normalisation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mimlab.errors import MimlabError
from mimlab.data import images as I
from mimlab.data.spec import parse_data_spec
from mimlab.pretrain import data as D
from mimlab.pretrain.masking import MaskGeometry


def test_parse_data_spec(tmp_path):
    spec = parse_data_spec("builtin")
    assert spec.kind == "builtin" and spec.params["classes"] == 100 and spec.params["per_class"] == 32
    spec = parse_data_spec("builtin:deadleaves?classes=7&per_class=3&seed=2")
    assert spec.params == {"kind": "deadleaves", "classes": 7, "per_class": 3, "seed": 2}
    assert parse_data_spec(str(tmp_path)).kind == "folder"
    for bad, msg in [("builtin:nope", "unknown built-in kind"), ("builtin?colour=3", "unknown key 'colour'"),
                     ("builtin?classes=x", "not an integer"), (str(tmp_path / "missing"), "no such directory")]:
        with pytest.raises(MimlabError, match=msg):
            parse_data_spec(bad)


def test_random_resized_crop_params_respect_scale_ratio_and_bounds():
    rng = np.random.default_rng(0)
    fractions, ratios = [], []
    for _ in range(2000):
        top, left, h, w = D.random_resized_crop_params(rng, 40, 60, (0.67, 1.0), (3 / 4, 4 / 3))
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 60 and h > 0 and w > 0
        fractions.append(h * w / 2400)
        ratios.append(w / h)
    assert min(fractions) > 0.6 and max(fractions) <= 1.0
    assert min(ratios) > 0.7 and max(ratios) < 1.4
    # impossible aspect: a centred crop with the ratio clamped to its bound (w / h = 4/3 on a 10 x 100 image)
    always_wide = np.random.default_rng(1)
    assert D.random_resized_crop_params(always_wide, 10, 100, (0.99, 1.0), (3 / 4, 4 / 3)) == (0, 43, 10, 13)


def test_items_are_a_pure_function_of_index_and_seed():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 16, 16, 3), dtype=np.uint8)
    geom = MaskGeometry((16, 16), 4, 4, 0.6)
    ds = D.PretrainDataset(I.ArraySource(images, np.arange(6)), D.Augment((16, 16), (0.67, 1.0)), target="simmim",
                           mask_fn=geom.sample)
    a, b, c = ds[(3, 123)], ds[(3, 123)], ds[(3, 124)]
    assert a["image"].dtype == torch.uint8 and a["image"].shape == (3, 16, 16) and a["label"] == 3
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert not (torch.equal(a["image"], c["image"]) and torch.equal(a["mask"], c["mask"]))
    assert int(a["mask"].sum()) == 10
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    ds[(1, 5)]                                 # items never touch the global RNG
    assert torch.equal(torch.rand(3), before)
    mae = D.PretrainDataset(I.ArraySource(images, np.arange(6)), D.Augment((16, 16), (0.2, 1.0)), target="mae",
                            num_tokens=16)
    noise = mae[(0, 9)]["noise"]
    assert noise.shape == (16,) and noise.dtype == torch.float32 and 0 <= noise.min() and noise.max() < 1


def test_normalize_matches_the_formula():
    x = torch.tensor([0, 255, 128], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    y = I.normalize(x)
    expect = [(0 - 0.485) / 0.229, (1 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
    assert y[1, :, 1, 1].tolist() == pytest.approx(expect, rel=1e-6)


def test_image_folder_scan(tmp_path):
    from PIL import Image

    for c in ("b", "a"):
        (tmp_path / c / "sub").mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8)).save(tmp_path / c / "sub" / f"{i}.png")
    (tmp_path / "empty").mkdir()
    files, labels, names = I.scan_class_folders(tmp_path)
    assert names == ["a", "b"] and labels == [0, 0, 1, 1]
    assert [f.relative_to(tmp_path).as_posix() for f in files][:2] == ["a/sub/0.png", "a/sub/1.png"]
    src = I.FileSource(files, labels)
    assert src.load(0).dtype == torch.uint8 and src.load(0).shape == (3, 8, 8)
    assert math.isclose(len(src), 4)
