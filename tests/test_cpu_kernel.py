"""The fused C kernel for CPU attention statistics against the torch path evaluated in float64, its build cache
(keyed by compiler and CPU) and its fallbacks."""
from __future__ import annotations

import math

import pytest
import torch

from mimlab.probe.attention_stats import ChunkSums, chunk_sums_tensors
from mimlab.probe.backends import cpu_kernel
from mimlab.probe.backends.torch_stats import feature_gram

pytestmark = pytest.mark.skipif(not cpu_kernel.is_available(),
                                reason=f"no C compiler here: {cpu_kernel.unavailable_reason()}")

NAMES = ("dist", "entropy", "negent", "prefix", "cross", "js", "colsum", "prefix_each")


def sums(s: ChunkSums) -> list[torch.Tensor]:
    return [getattr(s, n) for n in NAMES]


def grid_dist(g: int, patch: int = 16) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], 1).double() * patch
    return torch.cdist(pos, pos)


def compare(logits: torch.Tensor, dist: torch.Tensor, P: int, *, renormalize: bool = True, js: bool = True,
            rtol: float = 1e-5) -> None:
    """Kernel on float32 logits vs the float64 torch path on the same (float32-rounded) logits."""
    got = cpu_kernel.logits_sums(logits.float(), dist.float(), P, 1e-8, renormalize, js)
    want = chunk_sums_tensors(logits.float().double(), dist.double(), P, 1e-8, renormalize, js)
    assert bool(got.finite) and bool(want.finite)
    for name, g, w in zip(NAMES, sums(got), sums(want)):
        assert g.dtype == torch.float64 and g.shape == w.shape, name
        if not w.numel():                                        # no prefix tokens: no shares
            continue
        scale = float(w.abs().max()) + 1e-300
        err = float((g - w).abs().max()) / scale
        assert err <= rtol, f"{name}: relative error {err:.2e}"
    assert float(got.rowsum_err) < 1e-4                          # row sums before the exact renormalisation


def test_js_table_reproduces_float64_G():
    """The kernel's G(x) = x tanh x - log cosh x (Jensen-Shannon per key) is x^2 Q(x) with Q from a table of
    per-interval polynomials; evaluated as the kernel does (clamp, interval, s), it matches G computed
    independently (numpy tanh / log cosh; Taylor series near 0) to 2e-7 relative, near 0 and far out included."""
    import numpy as np

    tab = cpu_kernel.js_table().astype(np.float64)
    x = np.concatenate([np.geomspace(1e-6, 0.1, 200), np.linspace(0.1, 30.0, 20001)])
    v = np.minimum(x * (cpu_kernel.JS_NI / cpu_kernel.JS_XMAX), cpu_kernel.JS_NI - 1e-3)
    k = v.astype(np.int64)
    s = v - k - 0.5
    q = np.zeros_like(x)
    for d in range(cpu_kernel.JS_DEG, -1, -1):
        q = q * s + tab[d][k]
    xc = v * (cpu_kernel.JS_XMAX / cpu_kernel.JS_NI)
    got = xc * xc * q
    with np.errstate(over="ignore"):
        want = np.where(x < 1e-2, x**2 / 2 - x**4 / 4 + x**6 / 9, x * np.tanh(x) - np.log(np.cosh(x)))
    want = np.where(x > 20, math.log(2) - 2 * x * np.exp(-2 * x), want)      # cosh overflows float64 far out
    assert float(np.max(np.abs(got - want) / want)) < 2e-7


@pytest.mark.parametrize("sharp", [0.02, 1.0, 6.0], ids=["near-uniform", "moderate", "sharp"])
@pytest.mark.parametrize("P", [0, 1, 2])
def test_matches_float64_torch_path(sharp, P):
    g = 6
    K = g * g
    logits = torch.randn(3, 4, K, P + K, generator=torch.Generator().manual_seed(P)) * sharp
    compare(logits, grid_dist(g), P)


def test_near_uniform_keeps_relative_precision_of_tiny_values():
    """Logits of scale 1e-3: negentropy and KL are ~1e-7, tiny differences of ~log K quantities. The kernel
    keeps them to 3e-5 (the eager torch float32 path: 1.3e-3 on this input, which is why the bound is 1e-4)."""
    logits = torch.randn(2, 6, 196, 197, generator=torch.Generator().manual_seed(0)) * 1e-3
    compare(logits, grid_dist(14), 1, rtol=1e-4)


def test_masked_keys_query_subset_and_options():
    g, P = 5, 1
    K = g * g
    logits = torch.randn(2, 3, 7, P + K, generator=torch.Generator().manual_seed(1)) * 3
    logits[:, :, :, 4] = float("-inf")                           # a masked key (bool mask semantics)
    logits[0, 1, 2, :] = float("-inf")                           # a fully masked row: uniform, as the torch path
    rows = grid_dist(g)[3:10]                                    # a chunk of 7 queries out of 25
    compare(logits, rows, P)
    compare(logits, rows, P, renormalize=False, js=False)


def test_per_window_distances_and_one_head():
    g = 4
    K = g * g
    dist = torch.stack([grid_dist(g), 2 * grid_dist(g), grid_dist(g).sqrt()])[:, None]   # (b, 1, nq, K)
    compare(torch.randn(3, 1, K, K) * 2, dist, 0)
    compare(torch.randn(3, 5, K, K) * 2, dist, 0)


def test_hand_worked_uniform_and_one_hot():
    g = 3
    K = g * g
    d = grid_dist(g)
    out = cpu_kernel.logits_sums(torch.zeros(1, 2, K, K), d.float(), 0, 1e-8, True, True)
    dist, ent, negent, prefix, cross, js = sums(out)[:6]
    assert torch.allclose(dist, torch.full((1, 2), float(d.sum() / K), dtype=torch.float64), rtol=1e-6)
    assert torch.allclose(ent, torch.full((1, 2), K * math.log(K), dtype=torch.float64), rtol=1e-7)
    assert float(negent.abs().max()) < 1e-6 and float(js.abs().max()) < 1e-9
    one_hot = torch.full((1, 1, K, K), -1e9)
    one_hot[0, 0, torch.arange(K), torch.arange(K)] = 0.0      # every query attends itself
    dist1 = cpu_kernel.logits_sums(one_hot, d.float(), 0, 1e-8, True, True).dist
    assert float(dist1.abs().max()) == 0.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_logits_are_flagged(bad):
    logits = torch.randn(2, 2, 4, 4)
    logits[1, 0, 2, 3] = bad
    assert not bool(cpu_kernel.logits_sums(logits, grid_dist(2).float(), 0, 1e-8, True, True).finite)


def test_result_does_not_depend_on_threads(one_thread):
    logits = torch.randn(5, 3, 16, 17, generator=torch.Generator().manual_seed(3)) * 2
    d = grid_dist(4).float()
    a = cpu_kernel.logits_sums(logits, d, 1, 1e-8, True, True)
    torch.set_num_threads(2)
    b = cpu_kernel.logits_sums(logits, d, 1, 1e-8, True, True)
    for x, y in zip(sums(a), sums(b)):
        assert torch.equal(x, y)


def test_probe_uses_it_on_the_cpu_and_matches_the_torch_path():
    import timm

    from mimlab.probe.api import ProbeConfig, probe

    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=0).eval()
    x = torch.randn(4, 3, 32, 32)
    fast = probe({"m": m}, x, ProbeConfig(batch_size=4, kernel="cpu", bootstrap=0, cka=False))
    slow = probe({"m": m}, x, ProbeConfig(batch_size=4, kernel="torch", bootstrap=0, cka=False))
    assert fast.to_dict()["models"]["m"]["stats_kernel"] == "cpu"
    assert slow.to_dict()["models"]["m"]["stats_kernel"] == "torch"
    a, b = fast.to_dict()["models"]["m"]["layers"], slow.to_dict()["models"]["m"]["layers"]
    for la, lb in zip(a, b):
        for key in ("attention_distance_px", "head_kl", "head_js", "entropy", "prefix_mass", "nmi"):
            assert la[key] == pytest.approx(lb[key], rel=1e-5, abs=1e-9), key


@pytest.mark.slow
def test_portable_build_without_gcc_shuffles_gives_the_same_numbers(monkeypatch, tmp_path):
    """The code paths for compilers without GCC's __builtin_shuffle (Clang): per-lane table loads for JS and a
    scalar transpose of k. Built here with -DMIMLAB_PORTABLE; same sums as the default build."""
    q, k = _timm_like_qk(2, 3, 1 + 36, 32, 0.7, 11)
    args = (q, k, None, 0.2, 1, grid_dist(6).float(), 1e-8, True, True)
    want = cpu_kernel.qk_sums(*args)
    monkeypatch.setenv("MIMLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "CFLAGS", cpu_kernel.CFLAGS + ["-DMIMLAB_PORTABLE"])
    monkeypatch.setattr(cpu_kernel, "_LIB", None)
    monkeypatch.setattr(cpu_kernel, "_ERROR", None)
    assert cpu_kernel.is_available(), cpu_kernel.unavailable_reason()
    got = cpu_kernel.qk_sums(*args)
    for name, a, b in zip(NAMES, sums(got), sums(want)):
        assert torch.allclose(a, b, rtol=1e-6, atol=0), name


def test_unavailable_compiler_falls_back_to_torch_with_one_note(monkeypatch, tmp_path, capsys):
    """No compiler: the kernel is unavailable, the probe's default ("auto") runs the torch path and says so once on
    stderr; asking for the kernel by name is an error naming the reason."""
    import timm

    from mimlab.errors import ConfigError
    from mimlab.probe.api import ProbeConfig, probe

    monkeypatch.setattr(cpu_kernel, "_LIB", None)
    monkeypatch.setattr(cpu_kernel, "_ERROR", None)
    monkeypatch.setattr(cpu_kernel, "_NOTED", False)
    monkeypatch.setenv("MIMLAB_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))                    # no cc, gcc or clang
    monkeypatch.setenv("CC", "no-such-compiler")
    assert not cpu_kernel.is_available()
    assert "no C compiler" in cpu_kernel.unavailable_reason()
    m = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=0).eval()
    x = torch.randn(4, 3, 32, 32)
    for _ in range(2):
        res = probe({"m": m}, x, ProbeConfig(batch_size=4, bootstrap=0)).to_dict()
        assert res["models"]["m"]["stats_kernel"] == "torch" and res["cka_config"]["gram_kernel"] == "torch"
    err = capsys.readouterr().err
    assert err.count("the fused CPU statistics kernel is unavailable") == 1 and "torch path" in err
    with pytest.raises(ConfigError, match="kernel cpu: the fused CPU kernel is unavailable .*no C compiler"):
        probe({"m": m}, x, ProbeConfig(batch_size=4, bootstrap=0, kernel="cpu"))


def _qk_reference(q, k, mask, scale, P, dist, js=True, renormalize=True):
    """The torch path in float64 on logits formed in float64 from the same float32 q, k and mask."""
    s = (q.double()[:, :, P:] @ k.double().transpose(-1, -2)) * scale
    if mask is not None:
        m = mask.double()
        while m.dim() < 4:
            m = m.unsqueeze(0)
        s = s + m[..., P:, :]
    return chunk_sums_tensors(s, dist.double(), P, 1e-8, renormalize, js)


def _timm_like_qk(b, H, N, D, sharp, seed):
    """q and k as timm's Attention hands them to SDPA: views of one qkv tensor (non-contiguous)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, N, 3, H, D, generator=g).permute(2, 0, 3, 1, 4)
    return qkv[0] * sharp, qkv[1]


@pytest.mark.parametrize("sharp", [0.003, 0.5, 3.0], ids=["near-uniform", "moderate", "sharp"])
@pytest.mark.parametrize("P", [0, 1, 2])
def test_qk_entry_matches_float64_reference(sharp, P):
    """The logits are formed inside the kernel from strided q and k (no logits tensor); same numbers."""
    g = 5
    K = g * g
    q, k = _timm_like_qk(2, 3, P + K, 16, sharp, P)
    assert not q.is_contiguous()
    got = cpu_kernel.qk_sums(q, k, None, 0.25, P, grid_dist(g).float(), 1e-8, True, True)
    want = _qk_reference(q, k, None, 0.25, P, grid_dist(g))
    assert bool(got.finite)
    rtol = 1e-4 if sharp < 0.01 else 1e-5     # near uniform: KL ~ 1e-5 from float32 rows (as for the logits entry)
    for name, a, b in zip(NAMES, sums(got), sums(want)):
        err = float((a - b).abs().max()) / (float(b.abs().max()) + 1e-300) if b.numel() else 0.0
        assert err <= rtol, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("D", [8, 24, 64])
def test_qk_entry_head_dims_and_key_blocks(D):
    """k is transposed inside the kernel in 16 x 16 register blocks (head dims a multiple of 16) plus a scalar rest;
    37 tokens = 3 blocks of 16 keys, the last one partial."""
    g, P = 6, 1
    q, k = _timm_like_qk(2, 2, P + g * g, D, 0.3, D)
    got = cpu_kernel.qk_sums(q, k, None, D ** -0.5, P, grid_dist(g).float(), 1e-8, True, True)
    want = _qk_reference(q, k, None, D ** -0.5, P, grid_dist(g))
    for name, a, b in zip(NAMES, sums(got), sums(want)):
        err = float((a - b).abs().max()) / (float(b.abs().max()) + 1e-300) if b.numel() else 0.0
        assert err <= 1e-5, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("shape", [(1, 4), (2, 4), (2, 1), (1, 1)], ids=["bias", "per-image", "per-image-1h", "shared"])
def test_qk_entry_with_additive_masks_and_windows(shape):
    """Relative position bias / shifted-window masks broadcast over images or heads; one distance map per window."""
    g, P, H, b = 4, 0, 4, 2
    K = g * g
    q, k = _timm_like_qk(b, H, K, 8, 1.0, 7)
    gen = torch.Generator().manual_seed(8)
    mask = torch.randn(shape[0], shape[1], K, K, generator=gen)
    mask[..., 3] = -100.0                                        # Swin's shifted-window mask value
    dist = torch.stack([grid_dist(g), 0.5 * grid_dist(g)])[:, None]     # (b, 1, nq, K)
    got = cpu_kernel.qk_sums(q, k, mask, 0.3, P, dist.float(), 1e-8, True, True)
    want = _qk_reference(q, k, mask, 0.3, P, dist)
    for name, a, bb in zip(NAMES, sums(got), sums(want)):
        err = float((a - bb).abs().max()) / (float(bb.abs().max()) + 1e-300) if bb.numel() else 0.0
        assert err <= 1e-5, f"{name}: relative error {err:.2e}"


def test_qk_entry_flags_bad_values_and_refuses_bool_masks():
    q, k = _timm_like_qk(2, 2, 5, 4, 1.0, 0)
    q = q.clone()
    q[1, 0, 2, 0] = float("nan")
    assert not bool(cpu_kernel.qk_sums(q, k, None, 0.5, 1, grid_dist(2).float(), 1e-8, True, True).finite)
    with pytest.raises(ValueError, match="additive float"):
        cpu_kernel.qk_sums(k, k, torch.ones(5, 5, dtype=torch.bool), 0.5, 1, grid_dist(2).float(), 1e-8, True, True)


def test_qk_entry_same_numbers_on_an_openmp_team_or_our_threads(monkeypatch, one_thread):
    """The batch entry runs its image sets on an OpenMP team (torch's runtime) when the build has OpenMP, else one
    set per thread of our pool; one thread or two: bitwise the same sums."""
    assert cpu_kernel._lib().has_openmp() == 1           # GCC here: the team path is the one under test
    q, k = _timm_like_qk(5, 3, 1 + 16, 8, 1.5, 4)
    args = (q, k, None, 0.3, 1, grid_dist(4).float(), 1e-8, True, True)
    serial = cpu_kernel.qk_sums(*args)                     # one thread: one set, one call
    torch.set_num_threads(2)
    team = cpu_kernel.qk_sums(*args)
    real = cpu_kernel._LIB

    class NoOpenMP:                                        # the library as a build without OpenMP reports itself
        def __getattr__(self, name):
            return (lambda: 0) if name == "has_openmp" else getattr(real, name)

    monkeypatch.setattr(cpu_kernel, "_LIB", NoOpenMP())
    pool = cpu_kernel.qk_sums(*args)
    for name, a, b, c in zip(NAMES, sums(serial), sums(team), sums(pool)):
        assert torch.equal(a, b) and torch.equal(a, c), name


@pytest.mark.slow
def test_build_without_openmp_runs_serially_with_the_same_numbers(monkeypatch, tmp_path, one_thread):
    """A compiler without OpenMP (e.g. Clang without libomp): the -fopenmp-simd build, whose batch entries run one
    set per call on our own threads; same sums, and the failed OpenMP build is remembered, not retried."""
    q, k = _timm_like_qk(3, 2, 1 + 9, 16, 0.8, 5)
    args = (q, k, None, 0.25, 1, grid_dist(3).float(), 1e-8, True, True)
    want = cpu_kernel.qk_sums(*args)
    x = torch.randn(6, 300, generator=torch.Generator().manual_seed(1)) + 3
    gram_want = cpu_kernel.feature_gram_parts(x)
    monkeypatch.setenv("MIMLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "_LIB", None)
    monkeypatch.setattr(cpu_kernel, "_ERROR", None)
    monkeypatch.setattr(cpu_kernel, "OPENMP_FLAGS", (["-fopenmp", "-include", "no/such/header.h"], ["-fopenmp-simd"]))
    assert cpu_kernel.is_available(), cpu_kernel.unavailable_reason()
    assert cpu_kernel._LIB.has_openmp() == 0
    assert len(list((tmp_path / "cpu_kernel").glob("*.failed"))) == 1
    torch.set_num_threads(2)
    got = cpu_kernel.qk_sums(*args)
    for name, a, b in zip(NAMES, sums(got), sums(want)):
        assert torch.equal(a, b), name
    g, musq = cpu_kernel.feature_gram_parts(x)
    assert torch.equal(g, gram_want[0]) and torch.equal(musq, gram_want[1])


@pytest.mark.parametrize("n,d", [(1, 7), (3, 5), (4, 64), (5, 1000), (32, 4099), (37, 300)])
def test_feature_gram_kernel_matches_float64(n, d):
    """The C Gram of batch-centred features (CKA): float64 products of the float32-centred features. Against
    float64 centring and products: off by the float32 rounding of the centred values only (features with a large
    common offset, as residual streams have), and symmetric with the parts added in a fixed order."""
    g = torch.Generator().manual_seed(n * 1000 + d)
    x = torch.randn(n, d, generator=g) * torch.rand(d, generator=g) * 3 + 50
    xd = x.double()
    xc = xd - xd.mean(0)
    want = xc @ xc.T
    got, musq = cpu_kernel.feature_gram_parts(x)
    scale = float(want.diagonal().max()) + float(xd.mean(0).square().sum()) * 1e-7
    assert float((got - want).abs().max()) <= 2e-6 * scale
    assert torch.equal(got, got.T)
    assert abs(float(musq) - float(xd.mean(0).square().sum())) <= 1e-6 * float(xd.mean(0).square().sum())
    for path in (feature_gram(x, cpu_kernel.feature_gram_parts), feature_gram(x)):   # the probe's, both ways
        assert float((path - want).abs().max()) <= 2e-6 * scale


def test_feature_gram_kernel_strided_input_zero_variance_and_non_finite(one_thread):
    kernel = cpu_kernel.feature_gram_parts
    base = torch.randn(50, 8, generator=torch.Generator().manual_seed(2))
    x = base.T                                             # (8, 50), columns not contiguous
    assert torch.allclose(feature_gram(x, kernel), feature_gram(x.contiguous()), rtol=1e-6, atol=1e-9)
    same = torch.randn(1, 300).expand(6, 300) + 7.0        # every image identical: no variance -> all-zero Gram
    assert torch.equal(feature_gram(same, kernel), torch.zeros(6, 6, dtype=torch.float64))
    bad = torch.randn(6, 300)
    bad[2, 123] = float("nan")
    assert not bool(torch.isfinite(feature_gram(bad, kernel)).all())
    bad[2, 123] = float("inf")
    assert not bool(torch.isfinite(feature_gram(bad, kernel)).all())
    a = cpu_kernel.feature_gram_parts(base.T.contiguous() + 3)
    torch.set_num_threads(2)
    b = cpu_kernel.feature_gram_parts(base.T.contiguous() + 3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])      # threads do not change the sum order


@pytest.mark.slow
def test_openmp_build_that_does_not_load_gives_way_to_the_serial_one(monkeypatch, tmp_path):
    """An OpenMP build can compile and still fail to load (a process whose OpenMP runtime lacks a symbol it needs):
    the build without OpenMP is used then, not the slow torch path."""
    import ctypes

    real = ctypes.CDLL
    calls = []

    def cdll(path, *a, **k):
        calls.append(path)
        if len(calls) == 1:
            raise OSError(f"{path}: undefined symbol: GOMP_parallel (simulated)")
        return real(path, *a, **k)

    monkeypatch.setenv("MIMLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "_LIB", None)
    monkeypatch.setattr(cpu_kernel, "_ERROR", None)
    monkeypatch.setattr(cpu_kernel.ctypes, "CDLL", cdll)
    assert cpu_kernel.is_available(), cpu_kernel.unavailable_reason()
    assert len(calls) == 2 and cpu_kernel._LIB.has_openmp() == 0


def per_image_values(s: ChunkSums, nq: int, uniform: float) -> dict[str, torch.Tensor]:
    from mimlab.probe.attention_stats import finalize_image_stats

    return finalize_image_stats(s, nq, uniform)


@pytest.mark.parametrize("top_first", [False, True], ids=["top-anywhere", "top-on-first-patch-key"])
@pytest.mark.parametrize("P", [0, 1, 5])
def test_trained_like_peaked_rows_are_exact_to_1e5(top_first, P):
    """Rows as a trained network's (top probability 0.5-0.99, logit spreads up to 200, most keys 3-25 nats below
    the top): every per-image statistic within 1e-5 relative of float64, through both entries. (Before the fix,
    sum_j e^x_j was taken as K + sum_j (e^x_j - 1) in float32, which cancels for peaked rows: entropy was biased
    by ~1e-4 relative.)"""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from attention_cases import grid_dist as gd, trained_like_logits

    g, H = 16, 6
    K = g * g
    s = trained_like_logits(2, H, K, P, K, top_first=top_first, seed=P)
    dist = gd(g)
    uniform = float(dist.mean())
    want = per_image_values(chunk_sums_tensors(s, dist, P, 1e-8, True, True), K, uniform)
    got = per_image_values(cpu_kernel.logits_sums(s.float(), dist.float(), P, 1e-8, True, True), K, uniform)
    for name in want:
        if name == "prefix_mass" and P == 0:
            continue
        err = float(((got[name] - want[name]).abs() / want[name].abs().clamp_min(1e-30)).max())
        assert err <= 1e-5, f"{name}: relative error {err:.2e}"
    # the q.k entry on the same rows: q = the logits rows, k = the identity (scale 1): s = q k^T exactly
    q = torch.cat([torch.zeros(2, H, P, P + K, dtype=torch.float64), s], 2).float()
    k = torch.eye(P + K).expand(2, H, P + K, P + K).contiguous()
    got_qk = per_image_values(cpu_kernel.qk_sums(q, k, None, 1.0, P, dist.float(), 1e-8, True, True), K, uniform)
    for name in want:
        if name == "prefix_mass" and P == 0:
            continue
        err = float(((got_qk[name] - want[name]).abs() / want[name].abs().clamp_min(1e-30)).max())
        assert err <= 1e-5, f"qk entry, {name}: relative error {err:.2e}"


@pytest.mark.slow
def test_build_is_keyed_by_compiler_and_cpu_and_ships_as_a_source_file(monkeypatch, tmp_path):
    """The library's name hashes the C source, the flags, the compiler's version and the instruction set that
    -march=native selects here: a cache folder shared with a machine of another CPU never hands over its library."""
    assert cpu_kernel.SOURCE_FILE.is_file() and cpu_kernel.SOURCE_FILE.suffix == ".c"
    cc = cpu_kernel.compiler()
    ident = cpu_kernel.target_identity(cc, ["-fopenmp"])
    assert "__x86_64__" in ident or "__aarch64__" in ident          # the compiler's macros are in it
    assert "gcc" in ident.lower() or "clang" in ident.lower()
    here = cpu_kernel.build_tag(cc, ["-fopenmp"])
    assert cpu_kernel.build_tag(cc, ["-fopenmp"]) == here
    monkeypatch.setattr(cpu_kernel, "target_identity", lambda cc, flags: ident.replace("__AVX2__", "__NOAVX__") + "x")
    assert cpu_kernel.build_tag(cc, ["-fopenmp"]) != here              # another CPU: another library
    monkeypatch.setenv("MIMLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "_LIB", None)
    monkeypatch.setattr(cpu_kernel, "_ERROR", None)
    monkeypatch.setattr(cpu_kernel, "target_identity", lambda cc, flags: "cpu A")
    assert cpu_kernel.is_available()
    monkeypatch.setattr(cpu_kernel, "_LIB", None)
    monkeypatch.setattr(cpu_kernel, "target_identity", lambda cc, flags: "cpu B")
    assert cpu_kernel.is_available()
    assert len(list((tmp_path / "cpu_kernel").glob("cpu_kernel_*.so"))) == 2    # B built its own, never loaded A's
