"""The claim verdict rules on constructed inputs where the right answer is known."""
from __future__ import annotations

import numpy as np
import pytest

import math

from mimlab.reproduce.claims import (HOLDS, INCONCLUSIVE, NOT, Thresholds, bootstrap_detectable, claim_c1, claim_c2,
                                     claim_c3, claim_c4, claim_c5, claim_c6, collapse_ratio, evaluate_claims,
                                     gate_model, last_k, paired_interval, t80, t975, top_layers, welch_interval)

TH = Thresholds()


def test_t_table_and_welch_against_hand_computation():
    assert t975(1) == 12.706 and t975(10) == 2.228 and t975(1e9) == pytest.approx(1.96, abs=1e-6)
    assert 2.228 > t975(10.5) > 2.201
    # a = [1, 2, 3], b = [0, 0, 0]: d = 2, se = sqrt(1/3), dof = 2 -> t = 4.303
    d, lo, hi = welch_interval([1, 2, 3], [0, 0, 0])
    assert d == 2 and lo == pytest.approx(2 - 4.303 * np.sqrt(1 / 3)) and hi == pytest.approx(2 + 4.303 * np.sqrt(1 / 3))
    assert welch_interval([1.0], [0.0, 1.0]) is None


def _t_cdf(q: float, dof: float, n: int = 200_001) -> float:
    """Student's t CDF by Simpson's rule on its density (float64), independent of the tables."""
    c = math.exp(math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2)) / math.sqrt(dof * math.pi)
    x = np.linspace(0.0, q, n)
    f = c * (1 + x * x / dof) ** (-(dof + 1) / 2)
    h = q / (n - 1)
    return 0.5 + h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())


@pytest.mark.parametrize("dof", [1, 2, 3, 4, 5, 7, 10, 15, 20, 29, 30, 60, 1000])
def test_t_quantiles_against_the_integrated_density(dof):
    assert _t_cdf(t975(dof), dof) == pytest.approx(0.975, abs=2e-4)       # tables are rounded to 3 decimals
    assert _t_cdf(t80(dof), dof) == pytest.approx(0.80, abs=2e-4)


def test_paired_interval_and_detectable_effect_by_hand():
    # d = [1, 2, 3]: mean 2, sd 1, se 1/sqrt(3), dof 2: t_0.975 = 4.303, t_0.80 = 1.061
    iv = paired_interval([1.0, 2.0, 3.0])
    se = 1 / math.sqrt(3)
    assert (iv.estimate, iv.n, iv.dof) == (2.0, 3, 2) and iv.se == pytest.approx(se)
    assert (iv.lo, iv.hi) == (pytest.approx(2 - 4.303 * se), pytest.approx(2 + 4.303 * se))
    assert iv.detectable == pytest.approx((4.303 + 1.061) * se)
    assert paired_interval([0.5]) is None
    assert bootstrap_detectable(-1.96, 1.96) == pytest.approx(1.96 + 0.8416)


def test_pairing_removes_the_variation_both_models_share():
    """Seeds that move both models together (a hard or an easy draw of data order and head init): Welch's interval
    sees that spread, the per-seed differences do not."""
    base = [0.20, 0.45, 0.30, 0.60, 0.35]
    vals = {"mim": {"classify": [b + 0.05 + e for b, e in zip(base, [0.002, -0.001, 0.0, 0.001, -0.002])]},
            "sup": {"classify": base}}
    c = claim_c5(vals, "mim", "sup", TH).values["classify"]
    assert c["interval"] == "paired t" and c["verdict"] == HOLDS and c["ci"][0] > 0.04
    assert c["welch_ci"][0] < -0.01           # the unpaired interval of the same numbers decides nothing
    assert c["differences"] == pytest.approx([0.052, 0.049, 0.05, 0.051, 0.048])


def test_models_are_paired_by_seed_not_by_position():
    vals = {"mim": {"track": {0: 0.7, 1: 0.5, 2: 0.9, 5: 0.1}}, "sup": {"track": {2: 0.8, 0: 0.6, 1: 0.4}}}
    c = claim_c4(vals, "mim", "sup", TH).values["track"]
    assert c["seeds"] == [0, 1, 2] and c["differences"] == pytest.approx([0.1, 0.1, 0.1])
    assert c["unpaired_seeds"] == [5] and c["verdict"] == HOLDS
    assert claim_c4({"mim": {"track": {0: 0.7}}, "sup": {"track": {1: 0.6}}}, "mim", "sup", TH) \
        .values["track"]["verdict"] == INCONCLUSIVE


def test_layer_selections():
    assert top_layers(12) == slice(8, 12) and top_layers(6) == slice(4, 6) and top_layers(1) == slice(0, 1)
    assert last_k(12) == 3 and last_k(6) == 2 and last_k(2) == 1
    kl = np.array([1.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    # last 3 layers mean 0.1, the other 9 mean (3 + 0.6) / 9 = 0.4
    assert collapse_ratio(kl) == pytest.approx(0.1 / 0.4)


def _reps(mean, spread, R=200, seed=0):
    rng = np.random.default_rng(seed)
    return np.asarray(mean)[None] + spread * rng.standard_normal((R, len(mean)))


def test_c1_verdicts():
    L = 6
    sup = np.array([0.5, 0.6, 0.7, 0.8, 0.95, 0.97])
    mim = np.array([0.4, 0.5, 0.5, 0.5, 0.55, 0.6])
    c = claim_c1({"sup": sup, "mim": mim}, {"sup": _reps(sup, 0.01), "mim": _reps(mim, 0.01, seed=1)}, "mim", "sup", TH)
    assert c.verdict == HOLDS and c.values["delta"] == pytest.approx((0.95 + 0.97) / 2 - (0.55 + 0.6) / 2)
    c = claim_c1({"sup": mim, "mim": sup}, {"sup": _reps(mim, 0.01), "mim": _reps(sup, 0.01)}, "mim", "sup", TH)
    assert c.verdict == NOT
    c = claim_c1({"sup": sup, "mim": sup}, {"sup": _reps(sup, 0.05), "mim": _reps(sup, 0.05, seed=2)}, "mim", "sup", TH)
    assert c.verdict == INCONCLUSIVE


def test_c2_verdicts():
    sup = np.array([1.0, 1.0, 1.0, 1.0, 0.1, 0.1])     # last 2 of 6 collapsed: r = 0.1
    mim = np.array([1.0, 1.0, 1.0, 1.0, 0.9, 1.1])     # r = 1.0
    reps = {"sup": _reps(sup, 0.01), "mim": _reps(mim, 0.01)}
    assert claim_c2({"sup": sup, "mim": mim}, reps, "mim", "sup", TH).verdict == HOLDS
    reps2 = {"sup": _reps(mim, 0.01), "mim": _reps(mim, 0.01, seed=3)}
    assert claim_c2({"sup": mim, "mim": mim}, reps2, "mim", "sup", TH).verdict == NOT


def test_c3_thresholds():
    within = lambda v: np.full((4, 4), v) + np.eye(4) * (1 - v)
    assert claim_c3({"mim": within(0.9), "sup": within(0.6)}, "mim", "sup", TH).verdict == HOLDS
    assert claim_c3({"mim": within(0.6), "sup": within(0.9)}, "mim", "sup", TH).verdict == NOT
    assert claim_c3({"mim": within(0.62), "sup": within(0.6)}, "mim", "sup", TH).verdict == INCONCLUSIVE


def test_c4_c5_c6_direction_and_seeds():
    vals = {"mim": {"keypoints": [0.5, 0.52, 0.51], "depth": [0.30, 0.31, 0.29], "track": [0.6, 0.62, 0.61],
                    "classify": [0.800, 0.801, 0.799]},
            "sup": {"keypoints": [0.410, 0.411, 0.412], "depth": [0.40, 0.41, 0.39], "track": [0.5, 0.5, 0.52],
                    "classify": [0.800, 0.800, 0.801]},
            "sup_drop2": {"keypoints": [0.411, 0.412, 0.410], "depth": [0.60, 0.62, 0.61]}}
    c4 = claim_c4(vals, "mim", "sup", TH)
    assert c4.verdict == HOLDS and c4.values["depth"]["verdict"] == HOLDS   # lower RMSE is better
    assert claim_c5(vals, "mim", "sup", TH).verdict == HOLDS
    c6 = claim_c6(vals, "sup", "sup_drop2", TH, 2)
    assert c6.values["keypoints"]["verdict"] == HOLDS and c6.values["depth"]["verdict"] == NOT and c6.verdict == NOT
    one_seed = {"mim": {t: v[:1] for t, v in vals["mim"].items()}, "sup": {t: v[:1] for t, v in vals["sup"].items()}}
    assert claim_c4(one_seed, "mim", "sup", TH).verdict == INCONCLUSIVE


def test_gate_makes_claims_inconclusive_and_says_why():
    g = gate_model("mim", loss_ratio=0.98, loss_ratio_max=0.9, attn_change=0.001, attn_change_min=0.02,
                   cka_to_init=0.99, cka_to_init_max=0.95)
    assert not g["ok"] and "0.98x" in g["reason"] and "barely moved" in g["reason"]
    ok = gate_model("m", loss_ratio=0.5, loss_ratio_max=0.9, attn_change=0.001, attn_change_min=0.02,
                    cka_to_init=0.5, cka_to_init_max=0.9)
    assert ok["ok"]   # representations moved although attention did not
    sup = np.array([0.5, 0.6, 0.7, 0.8, 0.95, 0.97])
    mim = np.array([0.4, 0.5, 0.5, 0.5, 0.55, 0.6])
    claims = evaluate_claims(dist_norm={"sup": sup, "mim": mim}, dist_reps={"sup": _reps(sup, .01), "mim": _reps(mim, .01)},
                             kl={"sup": sup, "mim": mim}, kl_reps={"sup": _reps(sup, .01), "mim": _reps(mim, .01)},
                             cka_within={"sup": np.eye(6), "mim": np.eye(6)}, downstream={},
                             gates={"mim": g, "sup": {"ok": True, "reason": ""}}, mim="mim", sup="sup",
                             sup_drop=None, drop_k=2)
    assert claims["C1"].verdict == INCONCLUSIVE and claims["C1"].values["verdict_before_gate"] == HOLDS
    assert "not trained enough" in claims["C1"].reason and claims["C1"].gated_by == ["mim"]
    assert claims["C1"].to_dict()["gated_by"] == ["mim"]
    assert set(claims) == {"C1", "C2", "C3", "C4", "C5"}
