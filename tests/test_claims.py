"""The claim verdict rules on constructed inputs where the right answer is known."""
from __future__ import annotations

import numpy as np
import pytest

from mimlab.reproduce.claims import (HOLDS, INCONCLUSIVE, NOT, Thresholds, claim_c1, claim_c2, claim_c3, claim_c4,
                                     claim_c5, claim_c6, collapse_ratio, evaluate_claims, gate_model, last_k, t975,
                                     top_layers, welch_interval)

TH = Thresholds()


def test_t_table_and_welch_against_hand_computation():
    assert t975(1) == 12.706 and t975(10) == 2.228 and t975(1e9) == pytest.approx(1.96, abs=1e-6)
    assert 2.228 > t975(10.5) > 2.201
    # a = [1, 2, 3], b = [0, 0, 0]: d = 2, se = sqrt(1/3), dof = 2 -> t = 4.303
    d, lo, hi = welch_interval([1, 2, 3], [0, 0, 0])
    assert d == 2 and lo == pytest.approx(2 - 4.303 * np.sqrt(1 / 3)) and hi == pytest.approx(2 + 4.303 * np.sqrt(1 / 3))
    assert welch_interval([1.0], [0.0, 1.0]) is None


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
    assert "not trained enough" in claims["C1"].reason
    assert set(claims) == {"C1", "C2", "C3", "C4", "C5"}
