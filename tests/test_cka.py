"""Unbiased minibatch linear CKA against independent float64 computations and its invariances."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from mimlab.probe.api import ProbeConfig, probe
from mimlab.probe.cka import MinibatchCKA, cka_from_hsic, gram_linear, hsic1_matrix
from mimlab.probe.reference import linear_cka_full_batch


def _cka(*feature_sets, batch=None):
    n = feature_sets[0].shape[0]
    batch = batch or n
    acc = MinibatchCKA(len(feature_sets))
    for i in range(0, n, batch):
        acc.update(torch.stack([gram_linear(f[i:i + batch]) for f in feature_sets]))
    return acc.result()


def test_single_batch_equals_direct_full_batch_formula():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 30, generator=g, dtype=torch.float64)
    Y = X @ torch.randn(30, 20, generator=g, dtype=torch.float64) + 0.5 * torch.randn(40, 20, generator=g,
                                                                                      dtype=torch.float64)
    got = _cka(X, Y)[0, 1].item()
    assert got == pytest.approx(linear_cka_full_batch(X.numpy(), Y.numpy()), rel=1e-12)


def test_minibatch_is_ratio_of_summed_hsic():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(48, 25, generator=g, dtype=torch.float64)
    Y = torch.tanh(X @ torch.randn(25, 25, generator=g, dtype=torch.float64))

    def hsic(K, L):   # textbook U-statistic with explicit loops over the formula's terms (numpy)
        n = K.shape[0]
        K, L = K.copy(), L.copy()
        np.fill_diagonal(K, 0)
        np.fill_diagonal(L, 0)
        one = np.ones(n)
        return (np.trace(K @ L) + one @ K @ one * (one @ L @ one) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * one @ K @ L @ one) / (n * (n - 3))

    xy = xx = yy = 0.0
    for i in range(0, 48, 12):
        Kx = X[i:i + 12].numpy() @ X[i:i + 12].numpy().T
        Ky = Y[i:i + 12].numpy() @ Y[i:i + 12].numpy().T
        xy += hsic(Kx, Ky)
        xx += hsic(Kx, Kx)
        yy += hsic(Ky, Ky)
    assert _cka(X, Y, batch=12)[0, 1].item() == pytest.approx(xy / np.sqrt(xx * yy), rel=1e-12)


def test_orthogonal_transform_and_isotropic_scaling_give_one():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(64, 50, generator=g, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(50, 50, generator=g, dtype=torch.float64))
    c = _cka(X, X @ Q, 3.7 * X, batch=16)
    assert c[0, 1].item() == pytest.approx(1.0, abs=1e-12)
    assert c[0, 2].item() == pytest.approx(1.0, abs=1e-12)
    assert torch.allclose(c, c.T)


def test_independent_features_with_d_much_larger_than_n_give_about_zero():
    g = torch.Generator().manual_seed(3)
    n, d = 256, 20000
    X = torch.randn(n, d, generator=g)
    Y = torch.randn(n, d, generator=g)
    unbiased = _cka(X, Y, batch=64)[0, 1].item()
    assert abs(unbiased) < 0.02
    # the biased (centred-Gram) estimator is badly wrong here, which is why it is not used
    Kx = gram_linear(X)
    Ky = gram_linear(Y)
    H = torch.eye(n, dtype=torch.float64) - 1.0 / n
    Kc, Lc = H @ Kx @ H, H @ Ky @ H
    biased = ((Kc * Lc).sum() / torch.sqrt((Kc * Kc).sum() * (Lc * Lc).sum())).item()
    assert biased > 0.5


def test_negative_values_are_not_clamped():
    # two small independent sets: the unbiased estimate scatters around 0 and can be negative
    vals = []
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(8, 500, generator=g)
        Y = torch.randn(8, 500, generator=g)
        vals.append(_cka(X, Y)[0, 1].item())
    assert min(vals) < 0


def test_batches_smaller_than_four_are_left_out_and_counted():
    acc = MinibatchCKA(2)
    acc.update(torch.stack([torch.eye(3), torch.eye(3)]).double())
    assert acc.num_batches == 0 and acc.skipped_samples == 3
    with pytest.raises(ValueError):
        hsic1_matrix(torch.eye(3)[None])


def test_probe_cka_equals_direct_computation_on_block_outputs():
    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=4, depth=3, embed_dim=48, num_heads=3, num_classes=0)
    a = timm.create_model("vit_tiny_patch16_224", **kw).eval()
    b = timm.create_model("deit_tiny_distilled_patch16_224", **kw).eval()
    x = torch.randn(16, 3, 32, 32)
    res = probe({"a": a, "b": b}, x, config=ProbeConfig(batch_size=8, bootstrap=0))

    def outputs(m):
        feats = []
        hs = [blk.register_forward_hook(lambda mod, i, o: feats.append(o.detach().double().flatten(1)))
              for blk in m.blocks]
        with torch.no_grad():
            m.forward_features(x)
        for h in hs:
            h.remove()
        return feats

    fa, fb = outputs(a), outputs(b)
    sets = fa + fb
    want = _cka(*sets, batch=8)
    got_ab = torch.tensor(res.cka["a/b"], dtype=torch.float64)
    got_aa = torch.tensor(res.cka["a/a"], dtype=torch.float64)
    torch.testing.assert_close(got_ab, want[:3, 3:], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(got_aa, want[:3, :3], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(torch.tensor(res.cka["b/a"], dtype=torch.float64), got_ab.T)
    assert res.cka_info["num_batches"] == 2 and res.cka_info["estimator"] == "unbiased_minibatch"
    from mimlab.probe.backends import cpu_kernel   # the Grams above came from the C kernel where it builds (as on CI)
    assert res.cka_info["gram_kernel"] == ("cpu" if cpu_kernel.is_available() else "torch")
    # mean-pooled and CLS features are different feature choices, each consistent with its own definition
    res_cls = probe({"a": a}, x, config=ProbeConfig(batch_size=8, bootstrap=0, cka_features="cls"))
    cls = [f.reshape(16, -1, 48)[:, 0] for f in fa]
    torch.testing.assert_close(torch.tensor(res_cls.cka["a/a"], dtype=torch.float64), _cka(*cls, batch=8), rtol=1e-6, atol=1e-9)
