"""Property tests (hypothesis) for the production statistics: every attention metric and unbiased minibatch CKA.

Attention metrics go through the probe's streaming entry points exactly as `mimlab.probe.api` uses them: logits
(b, H, nq, N) are cut into query chunks, each chunk goes through `attention_stats.chunk_sums_tensors`, the chunk sums are
added with `ChunkSums.__iadd__`, and `finalize_image_stats` turns them into per-image, per-head values. The rows are
adversarial: near one-hot rows (logit gaps up to 1e4), rows with exact zeros (-inf logits, as a boolean attention
mask produces), uniform rows, prefix tokens, 1-key and 1-query grids, float32 and float64 statistics.

Bounds (docs/metrics.md, docs/reliability.md):
- head_kl >= -log(1 + K eps) (not >= 0: with the eps inside the logs, KL_eps(p||q) = sum p log((p+eps)/(q+eps))
  can be slightly negative, down to -log(1 + K eps) ~ -K eps; a derivation is in docs/reliability.md), finite;
- head_js in [0, ln 2]; entropy in [0, ln K]; prefix_mass in [0, 1]; NMI in [0, 1];
- attention distance in [0, max patch-centre distance] (with and without renormalisation), normalised distance
  = distance / uniform distance;
plus a rounding tolerance for float32 statistics. CKA (MinibatchCKA on gram_linear Grams, the probe's path): symmetric,
1 on identical inputs, invariant to orthogonal transforms and isotropic scaling, within [-1, 1] (Cauchy-Schwarz for
the U-centred inner product that the unbiased HSIC is), and undefined (NaN, never a number) for constant features.
"""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mimlab.models.layout import TokenLayout
from mimlab.probe.attention_stats import METRICS, chunk_sums_tensors, finalize_image_stats
from mimlab.probe.backends.torch_stats import feature_gram
from mimlab.probe.cka import MinibatchCKA, gram_linear
from mimlab.probe.reference import reference_metrics

EPS = 1e-8
# float32 statistics: per-query sums in float32 (relative rounding ~1e-7 of terms of size <= log K ~ 3)
TOL = {torch.float32: 2e-5, torch.float64: 1e-9}
EXAMPLES = {"bounds": 300, "reference": 150, "chunks": 80, "collapse": 100, "cka": 150, "cka_invariance": 100}
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

ROW_STYLES = ("uniform", "gaussian", "peaked", "one_hot", "masked", "mixed", "collapse")


@st.composite
def attention_case(draw, collapse: bool = True, only: str | None = None):
    """(layout, logits (b, H, N, N) as the probe sees them, dtype) with adversarial rows. "collapse": every query
    puts (nearly) all its attention on the same key, with a logit gap of 5 to 80 nats."""
    P = draw(st.integers(0, 2))
    gh, gw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    if gh * gw < 2:
        gw = 2
    patch = (draw(st.sampled_from([1, 4, 16])), draw(st.sampled_from([1, 4, 16])))
    H = draw(st.integers(1, 3))
    b = draw(st.integers(1, 2))
    style = only or draw(st.sampled_from(ROW_STYLES if collapse else ROW_STYLES[:-1]))
    gap = draw(st.floats(5.0, 80.0))
    scale = draw(st.sampled_from([0.0, 1e-3, 1.0, 10.0, 50.0, 1e4]))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    lay = TokenLayout(P, (gh, gw), patch)
    N = lay.num_tokens
    rng = np.random.default_rng(seed)
    s = rng.standard_normal((b, H, N, N))
    styles = [style] * N if style != "mixed" else list(rng.choice(ROW_STYLES[:-2], N))
    sink = int(rng.integers(P, N))
    for i, st_i in enumerate(styles):
        row = s[:, :, i]
        if st_i == "collapse":
            row[..., sink] += gap
        if st_i == "uniform":
            row[:] = 0.0
        elif st_i == "gaussian":
            row *= scale
        elif st_i == "peaked":                              # near one-hot: one key far above the rest
            row *= 1.0
            row[..., rng.integers(N)] += max(scale, 1.0) * 30
        elif st_i == "one_hot":                             # exact one-hot: every other key masked
            keep = rng.integers(N)
            row[:] = -np.inf
            row[..., keep] = 0.0
        elif st_i == "masked":                              # exact zeros: a random half of the keys masked
            row *= scale
            mask = rng.random(N) < 0.5
            mask[rng.integers(P, N)] = False                # keep at least one patch key
            row[..., mask] = -np.inf
    # softmax is shift invariant: move every row by a random constant (the probe must not care), keeping the row
    # maximum above -1e3 (see test_rows_entirely_below_minus_1e4_are_shift_invariant for why)
    s += rng.uniform(-1e3, 1e3, (b, H, N, 1))
    top = np.where(np.isfinite(s), s, -np.inf).max(-1, keepdims=True)
    s -= np.minimum(top + 1e3, 0.0)
    # a query whose patch keys are all masked would have no patch distribution: keep one patch key for every row
    patch_part = s[..., P:]
    dead = ~np.isfinite(patch_part).any(-1)
    if dead.any():
        idx = np.nonzero(dead)
        patch_part[idx + (rng.integers(0, N - P, size=len(idx[0])),)] = 0.0
    return lay, torch.from_numpy(s).to(dtype), dtype, style == "collapse"


def streaming_values(lay: TokenLayout, logits: torch.Tensor, chunks: list[int] | None = None, renormalize=True,
                     js=True, nmi_norm="geometric") -> dict[str, torch.Tensor]:
    """The probe's path: patch-query rows in chunks -> chunk_sums_tensors -> += -> finalize_image_stats."""
    P = lay.num_prefix_tokens
    N = lay.num_tokens
    D = lay.distance_matrix_px().to(logits.dtype)
    bounds = [P] + [P + c for c in (chunks or [])] + [N]
    sums = None
    for q0, q1 in zip(bounds[:-1], bounds[1:]):
        if q1 <= q0:
            continue
        part = chunk_sums_tensors(logits[:, :, q0:q1], D[q0 - P:q1 - P], P, EPS, renormalize, js)
        if sums is None:
            sums = part
        else:
            sums += part
    return finalize_image_stats(sums, lay.num_patches, lay.uniform_distance_px(), nmi_norm)


def check_bounds(lay: TokenLayout, v: dict[str, torch.Tensor], dtype, nmi: bool = True) -> None:
    tol = TOL[dtype]
    K = lay.num_patches
    dmax = float(lay.distance_matrix_px().max())
    for m in METRICS:
        assert torch.isfinite(v[m]).all(), m
    kl_floor = -math.log1p(K * EPS)
    assert v["head_kl"].min() >= kl_floor - tol, (v["head_kl"].min().item(), kl_floor)
    assert v["head_js"].min() >= -tol and v["head_js"].max() <= math.log(2) + tol, v["head_js"]
    assert v["entropy"].min() >= -tol and v["entropy"].max() <= math.log(K) + tol * max(1.0, math.log(K))
    assert v["prefix_mass"].min() >= -tol and v["prefix_mass"].max() <= 1 + tol
    d = v["attention_distance_px"]
    assert d.min() >= -tol * max(dmax, 1) and d.max() <= dmax * (1 + tol) + tol
    if lay.uniform_distance_px() > 0:
        torch.testing.assert_close(v["attention_distance_norm"], d / lay.uniform_distance_px())
    if nmi:
        assert v["nmi"].min() >= -tol and v["nmi"].max() <= 1 + tol, v["nmi"]


# ------------------------------------------------------------------------------------------- attention metrics
@settings(max_examples=EXAMPLES["bounds"], **SETTINGS)
@given(attention_case(), st.booleans(), st.sampled_from(["geometric", "arithmetic"]))
def test_attention_metrics_stay_within_their_bounds(case, renormalize, nmi_norm):
    """All metrics in their ranges (NMI under attention collapse too: the next tests check its accuracy there)."""
    lay, logits, dtype, collapsed = case
    v = streaming_values(lay, logits, renormalize=renormalize, nmi_norm=nmi_norm)
    check_bounds(lay, v, dtype, nmi=True)


@settings(max_examples=EXAMPLES["collapse"], **SETTINGS)
@given(attention_case(only="collapse"))
def test_nmi_bounds_under_attention_collapse_property(case):
    """What the bounds test leaves out for collapsed heads: NMI in [0, 1] and within 1e-3 of the float64 textbook
    value (true NMI of a collapsed head is ~0; float32 statistics reported up to order 1 before the clamp)."""
    lay, logits, dtype, _ = case
    v = streaming_values(lay, logits)
    check_bounds(lay, v, dtype, nmi=True)
    A = torch.softmax(logits.double(), -1).numpy()
    want = np.nan_to_num(reference_metrics(A, lay.num_prefix_tokens, lay.grid, lay.patch_size)["nmi"], nan=0.0)
    np.testing.assert_allclose(v["nmi"].mean(0).numpy(), want, rtol=0, atol=1e-3)


def test_nmi_stays_in_unit_interval_under_attention_collapse():
    """Found by the property tests: float32 statistics, 3 patch keys, every query with a 40-nat gap on key 0.
    The true NMI is ~1e-10; before mutual information was clamped to [0, min(H(Q), H(K))] the probe reported up
    to 1.27."""
    lay = TokenLayout(0, (1, 3), (16, 16))
    worst = 0.0
    for gap in (30.0, 35.0, 40.0):
        for seed in range(20):
            s = torch.randn(1, 1, 3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            s[..., 0] += gap
            v = streaming_values(lay, s.float())
            A = torch.softmax(s, -1).numpy()
            want = np.nan_to_num(reference_metrics(A, 0, lay.grid, lay.patch_size)["nmi"], nan=0.0)
            worst = max(worst, float(np.abs(v["nmi"].numpy()[0] - want).max()))
            assert 0.0 <= v["nmi"].min() and v["nmi"].max() <= 1.0
    assert worst < 1e-3, worst


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # the numpy reference divides 0/0 for undefined NMI
@settings(max_examples=EXAMPLES["reference"], **SETTINGS)
@given(attention_case())
def test_attention_metrics_equal_the_textbook_formulas(case):
    """Against the float64 textbook formulas (mimlab.probe.reference) on the same probabilities."""
    lay, logits, dtype, collapsed = case
    v = streaming_values(lay, logits)
    A = torch.softmax(logits.double(), -1).numpy()                     # -inf logits give exact zeros
    # the textbook path renormalises softmax(all keys) over the patch keys: it needs a patch mass that float64
    # represents (the probe does not: it works relative to the patch maximum, see the bounds test)
    assume(A[:, :, lay.num_prefix_tokens:, lay.num_prefix_tokens:].sum(-1).min() > 1e-200)
    ref = reference_metrics(A, lay.num_prefix_tokens, lay.grid, lay.patch_size, eps=EPS)
    H = logits.shape[1]
    tol = 2e-5 if dtype == torch.float32 else 1e-9
    for m in METRICS:
        got = v[m].mean(0).numpy()                                     # mean over images, as the probe reports
        want = np.asarray(ref[m], dtype=np.float64)
        if m == "prefix_mass" and lay.num_prefix_tokens == 0:
            assert np.all(got == 0)
            continue
        if m in ("head_kl", "head_js") and H == 1:
            assert np.all(got == 0)                                    # one head: no pair, defined as 0
            continue
        if m == "nmi":
            # NMI = I / sqrt(log nq * H(K)): the statistics give I to ~tol * log K absolutely (a difference of two
            # sums of size log K), so NMI's error grows like 1 / sqrt(H(K)) as attention collapses onto one key
            want = np.nan_to_num(want, nan=0.0)                        # H(K) = 0 or one query: defined as 0
            hk = nmi_hk(A, lay.num_prefix_tokens)
            nq = lay.num_patches
            cond = math.log(max(lay.num_patches, 2)) / np.sqrt(np.maximum(math.log(max(nq, 2)) * hk, 1e-300))
            np.testing.assert_array_less(np.abs(got - want), tol * 5 * np.minimum(cond.mean(0), 1 / tol) + 1e-12,
                                         err_msg=m)
            continue
        elif m == "head_kl":
            scale = max(1.0, math.log(1 / EPS))                        # KL terms reach log(1/eps) ~ 18
        elif m.startswith("attention_distance"):
            scale = max(1.0, float(np.abs(want).max()))
        else:
            scale = 1.0
        np.testing.assert_allclose(got, want, rtol=0, atol=tol * scale * 5, err_msg=m)


def nmi_hk(A: np.ndarray, P: int) -> np.ndarray:
    """H(K) per image and head (float64): entropy of the mean renormalised patch attention of the patch queries."""
    p = A[:, :, P:, P:]
    p = p / p.sum(-1, keepdims=True)
    pk = p.mean(2)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(pk > 0, pk * np.log(np.where(pk > 0, pk, 1.0)), 0.0).sum(-1)


@settings(max_examples=EXAMPLES["chunks"], **SETTINGS)
@given(attention_case(), st.data())
def test_query_chunking_does_not_change_the_metrics(case, data):
    """Streaming: any split of the queries into chunks gives the same per-image values."""
    lay, logits, dtype, collapsed = case
    K = lay.num_patches
    cuts = sorted(data.draw(st.lists(st.integers(1, max(1, K - 1)), max_size=3)))
    whole = streaming_values(lay, logits)
    split = streaming_values(lay, logits, chunks=cuts)
    for m in METRICS:
        if m == "nmi" and collapsed:     # ill-conditioned there (see the NMI collapse test): order-dependent rounding
            continue
        torch.testing.assert_close(split[m], whole[m], rtol=1e-5 if dtype == torch.float32 else 1e-10,
                                   atol=1e-6 if dtype == torch.float32 else 1e-12, msg=m)


def test_rows_entirely_below_minus_1e4_are_shift_invariant():
    lay = TokenLayout(0, (1, 2), (1, 1))
    s = torch.tensor([[[[0.0, -20.0], [-20.0, 0.0]]]], dtype=torch.float64)
    a = streaming_values(lay, s)
    b = streaming_values(lay, s - 2e4)          # the same attention
    for m in METRICS:
        torch.testing.assert_close(b[m], a[m], msg=m)


def test_kl_floor_is_reached_not_a_bug():
    """KL with eps inside both logs is negative for some pairs; the floor -log(1 + K eps) is the exact bound."""
    lay = TokenLayout(0, (1, 2), (16, 16))
    # head 0: p = (0.5, 0.5); head 1: the minimiser q_j + eps = p_j (1 + K eps) / (sum) gives a negative KL
    p = torch.tensor([0.9, 0.1], dtype=torch.float64)
    q = p * (1 + 2 * EPS) - EPS
    logits = torch.log(torch.stack([p, q]))[None, :, None, :].expand(1, 2, 2, 2).contiguous()
    v = streaming_values(lay, logits)
    kl_pq = float((p * (torch.log(p + EPS) - torch.log(q + EPS))).sum())
    assert kl_pq < 0 and v["head_kl"][0, 0].item() == pytest.approx(kl_pq, rel=1e-6)
    assert kl_pq >= -math.log1p(2 * EPS)


# ------------------------------------------------------------------------------------------------------ CKA
def cka(*sets: torch.Tensor, batch: int, gram=feature_gram) -> torch.Tensor:
    """The probe's CKA path: per batch a Gram per feature set (`feature_gram`: centred, float64), summed
    unbiased HSIC over the batches (`MinibatchCKA`)."""
    n = sets[0].shape[0]
    acc = MinibatchCKA(len(sets))
    for i in range(0, n, batch):
        acc.update(torch.stack([gram(s[i:i + batch]) for s in sets]))
    return acc.result()


@st.composite
def features(draw, min_n=4):
    n = draw(st.integers(min_n, 24))
    d = draw(st.integers(1, 12))
    batch = draw(st.integers(4, max(4, n)))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    kind = draw(st.sampled_from(["gaussian", "low_rank", "heavy", "offset", "related"]))
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    if kind == "low_rank":
        X = torch.randn(n, 1, generator=g, dtype=torch.float64) @ torch.randn(1, d, generator=g, dtype=torch.float64)
    elif kind == "heavy":
        X = X ** 3
    elif kind == "offset":
        X = X + 100.0                                           # large common offset: centring matters
    Y = torch.randn(n, draw(st.integers(1, 12)), generator=g, dtype=torch.float64)
    if kind == "related":
        Y = torch.tanh(X @ torch.randn(d, Y.shape[1], generator=g, dtype=torch.float64)) + 0.1 * Y
    return X, Y, batch


def _usable(c: torch.Tensor, i: int) -> bool:
    return bool(torch.isfinite(c[i, i]))


@settings(max_examples=EXAMPLES["cka"], **SETTINGS)
@given(features())
def test_cka_symmetric_one_on_identical_and_bounded(fx):
    X, Y, batch = fx
    c = cka(X, Y, X.clone(), batch=batch)
    assert torch.equal(c, c.T) or torch.allclose(c, c.T, rtol=1e-12, atol=1e-12)
    if not _usable(c, 0):      # every minibatch of X has zero U-centred variance: undefined, and NaN says so
        assert torch.isnan(c[0]).all()
        return
    assert c[0, 0].item() == pytest.approx(1.0, abs=1e-9)
    assert c[0, 2].item() == pytest.approx(1.0, abs=1e-9)
    if _usable(c, 1):
        assert -1 - 1e-9 <= c[0, 1].item() <= 1 + 1e-9


@settings(max_examples=EXAMPLES["cka_invariance"], **SETTINGS)
@given(features(), st.floats(1e-3, 1e3), st.integers(0, 2 ** 31 - 1))
def test_cka_invariant_to_orthogonal_transforms_and_isotropic_scaling(fx, scale, seed):
    X, Y, batch = fx
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(X.shape[1], X.shape[1], generator=g, dtype=torch.float64))
    R, _ = torch.linalg.qr(torch.randn(Y.shape[1], Y.shape[1], generator=g, dtype=torch.float64))
    c = cka(X, Y, X @ Q, scale * Y, (scale * X) @ Q, Y @ R, batch=batch)
    if not (_usable(c, 0) and _usable(c, 1)):
        return
    base = c[0, 1].item()
    for i, j in ((2, 1), (0, 3), (4, 5), (2, 3)):
        assert c[i, j].item() == pytest.approx(base, abs=1e-8), (i, j)
    assert c[0, 2].item() == pytest.approx(1.0, abs=1e-9) and c[0, 4].item() == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("value", [0.0, 1.0, 0.1, 3e4])
def test_cka_of_constant_features_is_nan_not_a_number(value):
    """A layer whose output is the same for every image has no variance: CKA is undefined (0/0) and must not come
    out as a ratio of rounding errors (before the probe centred its features, 0.1 * ones gave CKA values like
    0.3 against unrelated features)."""
    X = torch.full((8, 5), value, dtype=torch.float64)
    Y = torch.randn(8, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    c = cka(X, Y, batch=8)
    assert torch.isnan(c[0, 1]) and torch.isnan(c[0, 0]) and c[1, 1].item() == pytest.approx(1.0)


def test_large_common_offset_keeps_cka_precision():
    """Residual streams carry large offsets common to all images; centring before the Gram keeps full precision
    (X X^T of the raw features loses it as (offset / spread)^2)."""
    g = torch.Generator().manual_seed(4)
    X = torch.randn(16, 6, generator=g, dtype=torch.float64)
    Y = torch.tanh(X @ torch.randn(6, 6, generator=g, dtype=torch.float64))
    want = cka(X, Y, batch=8)[0, 1].item()
    off = torch.randn(1, 6, generator=g, dtype=torch.float64) * 1e5
    assert cka(X + off, Y, batch=8)[0, 1].item() == pytest.approx(want, abs=1e-9)
    raw = cka(X + off, Y, batch=8, gram=gram_linear)[0, 1].item()
    assert abs(raw - want) > 1e-6                       # the uncentred Gram loses the digits


def test_hypothesis_budget_is_small():
    """The example counts above keep this file well under a minute on 2 shared cores (docs/reliability.md)."""
    assert sum(EXAMPLES.values()) <= 1000
    t = time.perf_counter()
    lay = TokenLayout(1, (4, 4), (16, 16))
    streaming_values(lay, torch.zeros(2, 3, 17, 17))
    assert time.perf_counter() - t < 5
