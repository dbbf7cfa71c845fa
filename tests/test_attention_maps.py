"""`--maps`: the attention rows and the rollout the probe writes equal the float64 explicit attention of the same
model (timm's non-fused path) and a numpy rollout written from the formula, across batch boundaries and with
prefix tokens (class token, registers)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch

from mimlab.cli import main
from mimlab.errors import ConfigError
from mimlab.probe.api import probe
from mimlab.probe.reference import attention_maps_float64


def sharp_vit(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=3,
                          embed_dim=64, num_heads=4, num_classes=0, **kw).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("qkv.weight"):
                p.mul_(8.0)
    return m


def rollout_numpy(maps: list[np.ndarray]) -> np.ndarray:
    """prod over layers of (mean_h A_l + I) / 2, rows renormalised: (B, N, N)."""
    roll = None
    for a in maps:
        a = 0.5 * (a.mean(1) + np.eye(a.shape[-1]))
        a = a / a.sum(-1, keepdims=True)
        roll = a if roll is None else a @ roll
    return roll


@pytest.mark.parametrize("kw,prefix", [({}, 1), ({"reg_tokens": 2}, 3), ({"class_token": False,
                                                                        "global_pool": "avg"}, 0)])
def test_maps_equal_float64_explicit_attention(kw, prefix):
    model = sharp_vit(**kw)
    torch.manual_seed(1)
    x = torch.randn(5, 3, 32, 32)
    queries = ((0, 0), (3, 5), (7, 7))
    res = probe({"m": model}, x, batch_size=2, bootstrap=0, cka=False, maps=3, map_queries=queries)
    got = res.maps["m"]
    index = list(range(prefix)) + [prefix + r * 8 + c for r, c in queries]
    assert got["query_index"] == index and got["num_prefix"] == prefix
    assert len(got["queries"]) == prefix + 3 and got["queries"][-1] == "patch (7, 7)"
    ref = attention_maps_float64(model, x[:3])                    # list over layers of (3, H, N, N)
    want_rows = np.stack([a[:, :, index] for a in ref], axis=1)   # (3, L, H, Q, N)
    assert got["rows"].shape == want_rows.shape == (3, 3, 4, prefix + 3, prefix + 64)
    np.testing.assert_allclose(got["rows"], want_rows, rtol=1e-5, atol=1e-7)
    assert want_rows.max() > 20 / (prefix + 64)                   # peaked, not near-uniform
    np.testing.assert_allclose(got["rollout"], rollout_numpy(ref)[:, index], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got["rows"].sum(-1), 1.0, atol=1e-5)
    assert got["images"].shape == (3, 3, 32, 32)


def test_maps_hand_worked_rollout_two_layers():
    """Two layers, one head, two tokens: A1 = [[1, 0], [0.5, 0.5]], A2 = [[0, 1], [1, 0]].
    A'1 = [[1, 0], [0.25, 0.75]], A'2 = [[0.5, 0.5], [0.5, 0.5]]; rollout = A'2 A'1 = [[0.625, 0.375]] * 2."""
    a1 = np.array([[[[1.0, 0.0], [0.5, 0.5]]]])
    a2 = np.array([[[[0.0, 1.0], [1.0, 0.0]]]])
    np.testing.assert_allclose(rollout_numpy([a1, a2]), [[[0.625, 0.375], [0.625, 0.375]]])


def test_map_query_outside_the_grid_is_refused_before_any_forward():
    model = sharp_vit()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ConfigError, match="map_queries .*outside the 8x8 patch grid"):
        probe({"m": model}, torch.randn(2, 3, 32, 32), bootstrap=0, cka=False, maps=1, map_queries=((8, 0),))
    assert not calls


@pytest.mark.slow
def test_cli_maps_write_arrays_figures_and_report(tmp_path):
    torch.manual_seed(0)
    out = tmp_path / "out"
    ckpt = tmp_path / "m.pth"
    torch.save(sharp_vit().state_dict(), ckpt)
    argv = ["probe", f"m=vit_tiny_patch16_224@{ckpt}", "--model-kwargs",
            "img_size=32,patch_size=4,depth=3,embed_dim=64,num_heads=4", "--data", "builtin", "--images", "4",
            "--batch-size", "4", "--bootstrap", "0", "--no-cka", "--quiet", "--workers", "0", "--maps", "2",
            "--map-query", "2,3", "--out", str(out)]
    assert main(argv) == 0
    meta = json.loads((out / "maps.json").read_text())
    assert meta["m"]["queries"] == ["cls", "patch (2, 3)"]
    with np.load(out / "maps.npz") as z:
        assert z["m/rows"].shape == (2, 3, 4, 2, 65) and z["m/rollout"].shape == (2, 2, 65)
    pngs = sorted(p.name for p in (out / "maps").glob("*.png"))
    assert len(pngs) >= 4, pngs                                  # per image: heads grid per query + rollout
    html = (out / "report.html").read_text()
    assert "rollout" in html.lower() and "maps/" in html
