"""The probe's numbers against an independent float64 computation from full attention maps, and hand-worked cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch

from mimlab.models.layout import TokenLayout, inspect_layout
from mimlab.probe.api import ProbeConfig, probe
from mimlab.probe.attention_stats import METRICS, chunk_sums_tensors, finalize_image_stats
from mimlab.probe.reference import attention_maps_float64, reference_metrics

SMALL = dict(img_size=32, patch_size=4, depth=2, embed_dim=64, num_heads=4, num_classes=0)

MODELS = {
    "vit": ("vit_tiny_patch16_224", {}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "registers_cls": ("vit_tiny_patch16_224", dict(reg_tokens=3, no_embed_class=True)),
    "registers_no_cls": ("vit_tiny_patch16_224", dict(reg_tokens=3, no_embed_class=True, class_token=False,
                                                      global_pool="avg")),
    "no_prefix": ("vit_tiny_patch16_224", dict(class_token=False, global_pool="avg")),
    "non_square": ("vit_tiny_patch16_224", dict(img_size=(32, 24))),
    "beit": ("beit_base_patch16_224", dict(use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1)),
}
EXPECTED_PREFIX = {"vit": 1, "deit_distilled": 2, "registers_cls": 4, "registers_no_cls": 3, "no_prefix": 0,
                   "non_square": 1, "beit": 1}


def build(name: str, sharpen: float) -> torch.nn.Module:
    arch, extra = MODELS[name]
    torch.manual_seed(0)
    model = timm.create_model(arch, **{**SMALL, **extra}).eval()
    with torch.no_grad():
        for blk in model.blocks:            # trained models have sharp attention; random init is nearly uniform
            blk.attn.qkv.weight.mul_(sharpen)
            if name == "beit":              # give the relative position bias real values too
                blk.attn.relative_position_bias_table.normal_(0, 1.0)
    return model


@pytest.mark.parametrize("sharpen", [1.0, 6.0], ids=["random_init", "sharp"])
@pytest.mark.parametrize("name", list(MODELS))
def test_metrics_match_float64_reference(name, sharpen):
    model = build(name, sharpen)
    layout = inspect_layout(model)
    assert layout.num_prefix_tokens == EXPECTED_PREFIX[name]
    h, w = layout.img_size
    x = torch.randn(6, 3, h, w, generator=torch.Generator().manual_seed(1))
    maps = attention_maps_float64(model, x)
    assert len(maps) == len(model.blocks)
    assert maps[0].shape[-1] == layout.num_tokens
    res = probe({"m": model}, x, config=ProbeConfig(batch_size=4, bootstrap=0, cka=False)).to_dict()
    layers = res["models"]["m"]["layers"]
    for li, A in enumerate(maps):
        ref = reference_metrics(A, layout.num_prefix_tokens, layout.grid, layout.patch_size)
        for metric in METRICS:
            got = np.asarray(layers[li][metric])
            if metric == "prefix_mass" and layout.num_prefix_tokens == 0:
                assert np.all(got == 0)
                continue
            np.testing.assert_allclose(got, ref[metric], rtol=1e-4, atol=0, err_msg=f"{name} layer {li} {metric}")


def test_float64_stats_match_reference_tightly():
    model = build("vit", 1.0)
    x = torch.randn(4, 3, 32, 32)
    maps = attention_maps_float64(model, x)
    res = probe({"m": model}, x, config=ProbeConfig(batch_size=4, bootstrap=0, cka=False, stats_dtype="float64"))
    for li, A in enumerate(maps):
        ref = reference_metrics(A, 1, (8, 8), (4, 4))
        for metric in METRICS:
            # the remaining difference comes from the float32 forward pass, not the statistics
            np.testing.assert_allclose(res.models["m"]["layers"][li][metric], ref[metric], rtol=1e-6)


def test_non_square_grid_is_inspected_not_assumed():
    model = build("non_square", 1.0)
    lay = inspect_layout(model)
    assert lay.grid == (8, 6) and lay.patch_size == (4, 4) and lay.img_size == (32, 24)


def test_no_renormalize_scales_distance_by_patch_mass():
    model = build("vit", 6.0)
    x = torch.randn(4, 3, 32, 32)
    maps = attention_maps_float64(model, x)
    res = probe({"m": model}, x, config=ProbeConfig(batch_size=4, bootstrap=0, cka=False, renormalize=False))
    from mimlab.probe.reference import grid_distances
    D = grid_distances(1, (8, 8), (4, 4))
    for li, A in enumerate(maps):
        raw = A[:, :, 1:, 1:]                       # drop the prefix key without renormalising
        want = (raw * D).sum(-1).mean(-1).mean(0)
        np.testing.assert_allclose(res.models["m"]["layers"][li]["attention_distance_px"], want, rtol=1e-4)


# ---------------------------------------------------------------------------------------- hand-worked cases
def _values(logits, layout):
    D = layout.distance_matrix_px().float()
    P = layout.num_prefix_tokens
    s = chunk_sums_tensors(logits[:, :, P:], D, P, 1e-8, True, True)
    return finalize_image_stats(s, layout.num_patches, layout.uniform_distance_px())


def test_uniform_distance_closed_forms():
    # 2x2 grid of 16 px patches: each row sees distances 0, 16, 16, 16*sqrt(2)
    assert TokenLayout(1, (2, 2), (16, 16)).uniform_distance_px() == pytest.approx((32 + 16 * math.sqrt(2)) / 4)
    # ViT-B/16 at 224 (PAPER.md: about 116.5 px)
    assert TokenLayout(1, (14, 14), (16, 16)).uniform_distance_px() == pytest.approx(116.49, abs=0.01)


def test_uniform_attention():
    lay = TokenLayout(1, (3, 5), (8, 8))
    N = lay.num_tokens
    logits = torch.zeros(2, 3, N, N)                 # every row uniform over all tokens
    v = _values(logits, lay)
    K = lay.num_patches
    torch.testing.assert_close(v["attention_distance_px"], torch.full((2, 3), lay.uniform_distance_px(),
                                                                      dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(v["attention_distance_norm"], torch.ones(2, 3, dtype=torch.float64))
    assert v["head_kl"].abs().max() < 1e-12 and v["head_js"].abs().max() < 1e-12
    torch.testing.assert_close(v["entropy"], torch.full((2, 3), math.log(K), dtype=torch.float64))
    torch.testing.assert_close(v["prefix_mass"], torch.full((2, 3), 1 / N, dtype=torch.float64))
    assert v["nmi"].abs().max() < 1e-7


def test_one_hot_self_attention():
    lay = TokenLayout(0, (4, 4), (16, 16))
    N = lay.num_tokens
    logits = torch.eye(N).expand(1, 2, N, N) * 1e4   # attends only to itself
    v = _values(logits.clone(), lay)
    assert v["attention_distance_px"].abs().max() < 1e-9
    assert v["entropy"].abs().max() < 1e-6          # float32 statistics: log K is rounded once
    torch.testing.assert_close(v["nmi"], torch.ones(1, 2, dtype=torch.float64))
    assert v["head_kl"].abs().max() < 1e-9           # both heads identical


def test_one_hot_neighbour_attention_and_kl_between_known_heads():
    # head 0 attends to the right neighbour (distance = patch width), head 1 uniformly
    lay = TokenLayout(0, (1, 4), (16, 16))
    K = 4
    logits = torch.full((1, 2, K, K), -1e9)
    for i in range(K):
        logits[0, 0, i, (i + 1) % K] = 0.0
    logits[0, 1] = 0.0
    v = _values(logits, lay)
    # distances to the right neighbour: 16, 16, 16 and 48 (the wrap-around from the last patch)
    assert v["attention_distance_px"][0, 0].item() == pytest.approx((16 * 3 + 48) / 4)
    eps = 1e-8
    # KL(one-hot || uniform) = log((1 + eps) / (1/4 + eps)) + 3 * eps * log(eps / (1/4 + eps)) ~ log 4
    kl01 = (1 * math.log((1 + eps) / (0.25 + eps)))
    assert v["head_kl"][0, 0].item() == pytest.approx(kl01, rel=1e-6)
    # KL(uniform || one-hot) = sum_j 1/4 log((1/4 + eps) / (p_j + eps))
    kl10 = 0.25 * math.log((0.25 + eps) / (1 + eps)) + 0.75 * math.log((0.25 + eps) / eps)
    assert v["head_kl"][0, 1].item() == pytest.approx(kl10, rel=1e-6)
    # JS(one-hot, uniform): M = (5/8, 1/8, 1/8, 1/8)
    js = 0.5 * math.log(1 / 0.625) + 0.5 * (0.25 * math.log(0.25 / 0.625) + 0.75 * math.log(0.25 / 0.125))
    assert v["head_js"][0, 0].item() == pytest.approx(js, rel=1e-6)
    assert v["head_js"][0, 1].item() == pytest.approx(js, rel=1e-6)
    assert 0 <= js <= math.log(2)


def test_masked_keys_are_exact_zeros():
    # a -inf mask (bool False) on some keys: they get probability 0 and the statistics stay finite
    lay = TokenLayout(0, (2, 2), (16, 16))
    logits = torch.zeros(1, 2, 4, 4)
    logits[..., 3] = float("-inf")
    v = _values(logits, lay)
    for k, t in v.items():
        assert torch.isfinite(t).all(), k
    assert v["entropy"][0, 0].item() == pytest.approx(math.log(3))


def test_batch_size_does_not_change_attention_metrics_and_runs_are_bitwise_identical():
    model = build("vit", 6.0)
    x = torch.randn(12, 3, 32, 32)
    a = probe({"m": model}, x, config=ProbeConfig(batch_size=4, bootstrap=20, seed=3)).to_dict()
    b = probe({"m": model}, x, config=ProbeConfig(batch_size=4, bootstrap=20, seed=3)).to_dict()
    c = probe({"m": model}, x, config=ProbeConfig(batch_size=6, bootstrap=20, seed=3)).to_dict()
    for li in range(2):
        for metric in METRICS:
            assert a["models"]["m"]["layers"][li][metric] == b["models"]["m"]["layers"][li][metric]
            assert a["models"]["m"]["layers"][li]["ci"] == b["models"]["m"]["layers"][li]["ci"]
            np.testing.assert_allclose(a["models"]["m"]["layers"][li][metric],
                                       c["models"]["m"]["layers"][li][metric], rtol=1e-9)
    assert a["cka"] == b["cka"]


def test_bootstrap_interval_brackets_the_mean_and_shrinks_with_more_images():
    model = build("vit", 6.0)
    x = torch.randn(40, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    few = probe({"m": model}, x[:8], config=ProbeConfig(batch_size=8, bootstrap=200, cka=False)).to_dict()
    many = probe({"m": model}, x, config=ProbeConfig(batch_size=8, bootstrap=200, cka=False)).to_dict()
    for res in (few, many):
        layer = res["models"]["m"]["layers"][1]
        lo, hi = layer["layer_ci"]["attention_distance_px"]
        assert lo <= layer["layer_mean"]["attention_distance_px"] <= hi
        for h in range(4):
            assert layer["ci"]["head_kl"]["low"][h] <= layer["head_kl"][h] <= layer["ci"]["head_kl"]["high"][h]
    width = lambda r: np.subtract(*r["models"]["m"]["layers"][1]["layer_ci"]["attention_distance_px"][::-1])
    assert width(many) < width(few)


def test_js_can_be_skipped_and_is_then_nan_not_zero():
    model = build("vit", 6.0)
    x = torch.randn(4, 3, 32, 32)
    full = probe({"m": model}, x, config=ProbeConfig(batch_size=4, bootstrap=0, cka=False)).to_dict()
    nojs = probe({"m": model}, x, config=ProbeConfig(batch_size=4, bootstrap=0, cka=False, js=False)).to_dict()
    for li in range(2):
        a, b = full["models"]["m"]["layers"][li], nojs["models"]["m"]["layers"][li]
        assert all(math.isnan(v) for v in b["head_js"])
        assert a["head_kl"] == b["head_kl"] and a["attention_distance_px"] == b["attention_distance_px"]


def test_statistics_run_in_float32_under_autocast():
    """A bf16 forward changes the attention a little; the statistics of that attention must still be float32:
    before the fix the logits matmul inherited autocast and rows summed to 1 +- 1e-2."""
    model = build("vit", 6.0)
    x = torch.randn(4, 3, 32, 32)
    fp32 = probe({"m": model}, x, config=ProbeConfig(batch_size=4, bootstrap=0, cka=False)).to_dict()
    bf16 = probe({"m": model}, x, config=ProbeConfig(batch_size=4, precision="bf16", bootstrap=0, cka=False))
    assert bf16.models["m"]["max_rowsum_error"] < 1e-5
    for li in range(2):
        np.testing.assert_allclose(bf16.models["m"]["layers"][li]["attention_distance_px"],
                                   fp32["models"]["m"]["layers"][li]["attention_distance_px"], rtol=5e-2)


def test_small_prefix_mass_keeps_relative_precision():
    # one prefix key with a very low logit: m ~ 1e-6 must come out to float32 relative precision
    lay = TokenLayout(1, (2, 2), (16, 16))
    logits = torch.zeros(1, 1, 5, 5)
    logits[..., 0] = -12.0
    v = _values(logits, lay)
    want = math.exp(-12) / (math.exp(-12) + 4)
    assert v["prefix_mass"][0, 0].item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("top_first", [False, True], ids=["top-anywhere", "top-on-first-patch-key"])
@pytest.mark.parametrize("P", [0, 1, 2, 5])
def test_torch_float32_path_is_exact_on_trained_like_rows(top_first, P):
    """The definition in float32 on rows as a trained network's (top probability 0.5-0.99, logit spreads up to
    200): every per-image statistic within 1e-5 relative of float64, also when a row's maximum is its first patch
    key (the row normaliser's baseline used to be that key: 1 for such rows, so its float32 sum of K terms ~ -1
    cancelled and entropy and NMI were off by ~3e-4)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from attention_cases import grid_dist, trained_like_logits

    g = 16
    K = g * g
    s = trained_like_logits(2, 6, K, P, K, top_first=top_first, seed=10 + P)
    D = grid_dist(g)
    u = float(D.mean())
    want = finalize_image_stats(chunk_sums_tensors(s, D, P, 1e-8, True, True), K, u)
    got = finalize_image_stats(chunk_sums_tensors(s.float(), D.float(), P, 1e-8, True, True), K, u)
    for name in METRICS:
        if name == "prefix_mass" and P == 0:
            continue
        err = float(((got[name] - want[name]).abs() / want[name].abs().clamp_min(1e-30)).max())
        assert err <= 1e-5, f"{name}: relative error {err:.2e}"


def test_token_norm_statistics_hand_worked():
    """Two images, a class token and a register, a 2x3 patch grid: patch norms 1..6 scaled per image, one planted
    high-norm token per image; median (lower middle), max, outliers above k x median and where they are."""
    from mimlab.probe.token_norms import TokenNormStats

    def tokens(norms):
        t = torch.zeros(len(norms), 4)
        t[:, 0] = torch.tensor(norms, dtype=torch.float32)      # a token's norm is its first coordinate here
        return t

    img1 = tokens([10.0, 7.0] + [1, 2, 3, 2, 1, 20])             # prefix: cls 10, register 7; outlier at (1, 2)
    img2 = tokens([4.0, 1.0] + [2, 2, 30, 2, 2, 2])              # outlier at (0, 2)
    s = TokenNormStats(num_prefix=2, grid=(2, 3), k=3.0)
    s.update(torch.stack([img1, img2]))
    d = s.to_dict(("cls", "register"))
    # image 1: sorted patch norms 1,1,2,2,3,20 -> lower median 2, max 20, outliers > 6: the 20
    # image 2: 2,2,2,2,2,30 -> median 2, max 30, outliers > 6: the 30
    assert d["patch_median"] == 2.0 and d["patch_max"] == 25.0 and d["outliers_per_image"] == 1.0
    assert d["outlier_map"] == [[0.0, 0.0, 0.5], [0.0, 0.0, 0.5]]
    assert d["prefix"] == {"roles": ["cls", "register"], "norm": [7.0, 4.0]}


def test_probe_records_token_norms_and_prefix_roles():
    """The probe's token_norms per layer equal the norms of the block outputs computed directly; DeiT's two
    prefix tokens are the class and the distillation token, and their masses add up to the prefix mass."""
    m = timm.create_model("deit_tiny_distilled_patch16_224", **SMALL).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    res = probe({"m": m}, x, ProbeConfig(batch_size=4, bootstrap=0, cka=False)).to_dict()["models"]["m"]
    assert res["prefix_roles"] == ["cls", "dist"]
    outs = []
    handles = [b.register_forward_hook(lambda mod, i, o: outs.append(o.detach())) for b in m.blocks]
    with torch.no_grad():
        m.forward_features(x)
    for h in handles:
        h.remove()
    for layer, o in zip(res["layers"], outs):
        n = o.double().norm(dim=-1)
        assert layer["token_norms"]["patch_median"] == pytest.approx(float(n[:, 2:].median(1).values.mean()), rel=1e-6)
        assert layer["token_norms"]["prefix"]["norm"] == pytest.approx(n[:, :2].mean(0).tolist(), rel=1e-6)
        np.testing.assert_allclose(np.add(layer["cls_mass"], layer["dist_mass"]), layer["prefix_mass"], rtol=1e-6)
