"""The paper's claims C1-C6 as explicit statistical tests with a verdict: holds / does_not_hold / inconclusive.

Inputs are plain numbers: the probe's per-layer means and their bootstrap replicates (the same Poisson weights for
every model of a probe run, so differences between models are *paired*), downstream metrics over seeds, and the
"trained enough" gates. Every verdict carries the statistic, its value, its 95% interval, the threshold and the
rule that was applied, so the report can print them and a reader can disagree with the rule, not guess it.

Rules (95% intervals):
- C1 (supervised top layers more global than MIM): statistic = mean normalised attention distance over the top
  third of the layers, Δ = supervised - MIM; paired bootstrap interval of Δ. holds if it lies above 0,
  does_not_hold if below 0, inconclusive if it contains 0.
- C2 (supervised head diversity collapses in its last layers, MIM's does not): r = mean head KL over the last
  k = max(1, round(L/4)) layers / mean head KL over the other layers (the paper's "last three of twelve"); holds if
  r_supervised's interval lies below `collapse_ratio` (0.5) and the paired interval of r_MIM - r_supervised lies
  above 0; does_not_hold if r_supervised's interval lies above `collapse_ratio` or r_MIM - r_supervised below 0.
- C3 (MIM's layers more uniformly similar by CKA): statistic = mean off-diagonal linear CKA within a model,
  Δ = MIM - supervised (no interval: unbiased minibatch CKA); holds if Δ >= `cka_margin` (0.05), does_not_hold if
  Δ <= -`cka_margin`, else inconclusive.
- C4 (MIM better on keypoints AP, depth RMSE, tracking SUC) and C5 (MIM at least as good on fine-grained top-1):
  per seed, the difference of the two models' metric in the task's "better" direction; the paired t 95% interval of
  its mean (n - 1 degrees of freedom). Seed s gives every backbone the same batches, augmentation and head
  initialisation (tests/test_transfer_pairing.py), so the seed-to-seed variation that both models share cancels:
  the reason the interval is paired rather than Welch's (docs/reproduce.md, "Why paired"). C4 per task: holds if
  the interval lies above 0, does_not_hold if below 0; C4 holds if every task holds, does_not_hold if any task
  does not, else inconclusive. C5 (non-inferiority, margin `noninferiority` = 0.01 of the metric): holds if the
  interval lies above -margin, does_not_hold if it lies below -margin. Fewer than 2 common seeds: inconclusive.
- C6 (dropping the supervised model's last blocks does not hurt geometric tasks): non-inferiority of
  drop-last-K vs the full supervised model on keypoints and depth, relative margin 2%: per seed the relative change
  (difference / the full model's mean, in the "better" direction), paired t interval; per task holds if the
  interval lies above -2%, does_not_hold if below; C6 holds if both hold.
- Every interval comes with its detectable effect: the true difference the rule detects with 80% power at the
  observed spread, (t_0.975 + t_0.80) x its standard error (for a bootstrap interval, se = width / (2 x 1.96)).
- Any claim involving a model that failed its "trained enough" gate is inconclusive, and says which gate failed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from mimlab.transfer.tasks import TASKS

HOLDS, NOT, INCONCLUSIVE = "holds", "does_not_hold", "inconclusive"

# task -> (its main metric, higher is better?), as the tasks declare them
TASK_METRIC = {name: (spec.main_metric, spec.higher_is_better) for name, spec in TASKS.items()}


@dataclass
class Thresholds:
    level: float = 0.95
    collapse_ratio: float = 0.5
    cka_margin: float = 0.05
    noninferiority: float = 0.01
    relative_margin: float = 0.02


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    a = (1 - level) / 2
    lo, hi = np.quantile(np.asarray(samples, dtype=np.float64), [a, 1 - a])
    return float(lo), float(hi)


def _sign_verdict(lo: float, hi: float, threshold: float = 0.0) -> str:
    if lo > threshold:
        return HOLDS
    if hi < threshold:
        return NOT
    return INCONCLUSIVE


def top_layers(num_layers: int) -> slice:
    """The top third of the layers (at least one)."""
    return slice(num_layers - max(1, math.ceil(num_layers / 3)), num_layers)


def last_k(num_layers: int) -> int:
    """The paper's 'last three of twelve', scaled: max(1, round(L / 4))."""
    return max(1, int(round(num_layers / 4)))


def layer_stat(values: np.ndarray, layers: slice) -> np.ndarray:
    """values (..., L) -> mean over the chosen layers."""
    return np.asarray(values)[..., layers].mean(-1)


def collapse_ratio(kl: np.ndarray) -> np.ndarray:
    """kl (..., L): mean head KL over the last k layers / mean over the others."""
    L = kl.shape[-1]
    k = last_k(L)
    return kl[..., L - k:].mean(-1) / np.maximum(kl[..., : L - k].mean(-1), 1e-300)


# two-sided 95% quantiles of Student's t (t_{0.975}) for 1..30 degrees of freedom (standard tables)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


# one-sided 80% quantiles of Student's t (t_{0.80}) for 1..30 degrees of freedom (standard tables): power
_T80 = [1.376, 1.061, 0.978, 0.941, 0.920, 0.906, 0.896, 0.889, 0.883, 0.879, 0.876, 0.873, 0.870, 0.868, 0.866,
        0.865, 0.863, 0.862, 0.861, 0.860, 0.859, 0.858, 0.858, 0.857, 0.856, 0.856, 0.855, 0.855, 0.854, 0.854]


def _t_table(table: list[float], limit: float, dof: float) -> float:
    """A t quantile for a (possibly fractional) number of degrees of freedom: the table, linear in 1/dof between
    entries and from dof 30 to the normal quantile `limit`."""
    if dof <= 1:
        return table[0]
    if dof >= 30:
        return limit + (table[-1] - limit) * 30 / dof
    lo = int(math.floor(dof))
    hi = lo + 1
    w = (1 / dof - 1 / hi) / (1 / lo - 1 / hi)
    return w * table[lo - 1] + (1 - w) * table[hi - 1]


def t975(dof: float) -> float:
    """t_{0.975}: the two-sided 95% interval's quantile."""
    return _t_table(_T975, 1.960, dof)


def t80(dof: float) -> float:
    """t_{0.80}: the quantile that 80% power adds to the interval's."""
    return _t_table(_T80, 0.8416, dof)


@dataclass
class Interval:
    """A mean difference, its 95% t interval [lo, hi], standard error, degrees of freedom and number of pairs."""
    estimate: float
    lo: float
    hi: float
    se: float
    dof: float
    n: int

    @property
    def detectable(self) -> float:
        """The true difference this design detects with 80% power at the observed spread: (t_0.975 + t_0.80) se."""
        return (t975(self.dof) + t80(self.dof)) * self.se


def paired_interval(differences: Sequence[float], level: float = 0.95) -> Interval | None:
    """Mean of per-seed differences d_i and its paired t interval: mean(d) +- t_0.975(n - 1) sd(d) / sqrt(n);
    None with fewer than 2 pairs."""
    if abs(level - 0.95) > 1e-12:
        raise ValueError("only 95% intervals are supported")
    d = np.asarray(differences, float)
    n = len(d)
    if n < 2:
        return None
    m = float(d.mean())
    se = float(d.std(ddof=1) / math.sqrt(n))
    half = t975(n - 1) * se
    return Interval(m, m - half, m + half, se, n - 1, n)


def bootstrap_detectable(lo: float, hi: float) -> float:
    """The detectable effect of a percentile bootstrap interval, read as normal: se = (hi - lo) / (2 x 1.96)."""
    return (1.960 + 0.8416) * (hi - lo) / (2 * 1.960)


def welch_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> tuple[float, float, float] | None:
    """Mean difference mean(a) - mean(b) and its Welch t interval; None with fewer than 2 values on a side."""
    if abs(level - 0.95) > 1e-12:
        raise ValueError("only 95% intervals are supported")
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or len(b) < 2:
        return None
    d = a.mean() - b.mean()
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return d, d, d
    dof = (va + vb) ** 2 / ((va ** 2) / (len(a) - 1) + (vb ** 2) / (len(b) - 1))
    t = t975(dof)
    return d, d - t * se, d + t * se


@dataclass
class Claim:
    id: str
    text: str
    verdict: str
    statistic: str
    rule: str
    values: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    gated_by: list[str] = field(default_factory=list)     # the models whose failed gate made it inconclusive

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "text": self.text, "statistic": self.statistic, "rule": self.rule,
                "values": self.values, "reason": self.reason, "gated_by": self.gated_by}


def _gated(claim: Claim, gates: dict[str, dict[str, Any]], models: Sequence[str]) -> Claim:
    gated = [m for m in models if m in gates and not gates[m]["ok"]]
    if gated and claim.verdict != INCONCLUSIVE:
        claim.values["verdict_before_gate"] = claim.verdict
        claim.verdict = INCONCLUSIVE
    if gated:
        claim.gated_by = gated
        claim.reason = "not trained enough to compare — " + "; ".join(f"{m}: {gates[m]['reason']}" for m in gated)
    return claim


def claim_c1(dist_norm: dict[str, np.ndarray], reps: dict[str, np.ndarray], mim: str, sup: str,
             th: Thresholds) -> Claim:
    """dist_norm[label]: (L,) layer means; reps[label]: (R, L) paired bootstrap replicates."""
    L = len(dist_norm[sup])
    sl = top_layers(L)
    s_sup, s_mim = layer_stat(dist_norm[sup], sl), layer_stat(dist_norm[mim], sl)
    lo, hi = percentile_interval(layer_stat(reps[sup], sl) - layer_stat(reps[mim], sl), th.level)
    return Claim("C1", "supervised top layers are more global than MIM's", _sign_verdict(lo, hi),
                 f"mean normalised attention distance over layers {sl.start}..{L - 1}; Δ = {sup} - {mim}",
                 "holds if the paired 95% bootstrap interval of Δ lies above 0; does_not_hold if below 0",
                 {sup: float(s_sup), mim: float(s_mim), "delta": float(s_sup - s_mim), "ci": [lo, hi],
                  "detectable": bootstrap_detectable(lo, hi)})


def claim_c2(kl: dict[str, np.ndarray], reps: dict[str, np.ndarray], mim: str, sup: str, th: Thresholds) -> Claim:
    r_sup, r_mim = float(collapse_ratio(kl[sup])), float(collapse_ratio(kl[mim]))
    rs, rm = collapse_ratio(reps[sup]), collapse_ratio(reps[mim])
    sup_lo, sup_hi = percentile_interval(rs, th.level)
    d_lo, d_hi = percentile_interval(rm - rs, th.level)
    if sup_hi < th.collapse_ratio and d_lo > 0:
        verdict = HOLDS
    elif sup_lo > th.collapse_ratio or d_hi < 0:
        verdict = NOT
    else:
        verdict = INCONCLUSIVE
    k = last_k(len(kl[sup]))
    return Claim("C2", "supervised head diversity collapses in its last layers, MIM's does not", verdict,
                 f"r = mean head KL of the last {k} layers / mean of the others; per model, and r_{mim} - r_{sup}",
                 f"holds if r_{sup}'s 95% interval lies below {th.collapse_ratio} and the paired interval of "
                 f"r_{mim} - r_{sup} above 0; does_not_hold if r_{sup}'s interval lies above {th.collapse_ratio} "
                 "or the difference's below 0",
                 {f"r_{sup}": r_sup, f"r_{sup}_ci": [sup_lo, sup_hi], f"r_{mim}": r_mim,
                  "difference_ci": [d_lo, d_hi], "detectable": bootstrap_detectable(d_lo, d_hi)})


def mean_offdiag(m: np.ndarray) -> float:
    m = np.asarray(m, float)
    n = m.shape[0]
    return float((m.sum() - np.trace(m)) / (n * (n - 1))) if n > 1 else float("nan")


def claim_c3(cka_within: dict[str, np.ndarray], mim: str, sup: str, th: Thresholds) -> Claim:
    a, b = mean_offdiag(cka_within[mim]), mean_offdiag(cka_within[sup])
    d = a - b
    verdict = HOLDS if d >= th.cka_margin else NOT if d <= -th.cka_margin else INCONCLUSIVE
    return Claim("C3", "MIM's layers are more uniformly similar (CKA) than the supervised model's", verdict,
                 f"mean off-diagonal layer-by-layer linear CKA; Δ = {mim} - {sup}",
                 f"holds if Δ >= {th.cka_margin}; does_not_hold if Δ <= -{th.cka_margin} (no interval: unbiased "
                 "minibatch CKA is a single estimate)", {mim: a, sup: b, "delta": d, "detectable": th.cka_margin})


def _by_seed(v: Sequence[float] | dict[Any, float] | None) -> dict[Any, float]:
    """A model's per-seed results: {seed: value}, or a list in seed order (position = seed index)."""
    if not v:
        return {}
    return dict(v) if isinstance(v, dict) else dict(enumerate(v))


def task_compare(values: dict[str, dict[str, Any]], task: str, a: str, b: str, th: Thresholds,
                 margin: float = 0.0, relative: bool = False) -> dict[str, Any]:
    """Compare model a vs b on a task in its 'better' direction: the paired t interval of the per-seed differences
    (a_s - b_s) * sign, divided by |mean(b)| if relative. Welch's interval of the same numbers is kept beside it
    (`welch_ci`) to show what pairing bought."""
    metric, higher = TASK_METRIC[task]
    ra, rb = _by_seed(values.get(a, {}).get(task)), _by_seed(values.get(b, {}).get(task))
    out: dict[str, Any] = {"metric": metric, "higher_is_better": higher, a: list(ra.values()), b: list(rb.values()),
                           "compared": [a, b], "relative": relative, "threshold": -margin}
    if not ra or not rb:
        out.update(verdict=INCONCLUSIVE, note="missing results")
        return out
    seeds = [s for s in ra if s in rb]
    out[f"mean_{a}"], out[f"mean_{b}"] = float(np.mean(list(ra.values()))), float(np.mean(list(rb.values())))
    unpaired = sorted(set(ra) ^ set(rb), key=str)
    if unpaired:
        out["unpaired_seeds"] = unpaired            # left out of the differences
    sign = 1.0 if higher else -1.0
    scale = (abs(float(np.mean([rb[s] for s in seeds]))) if relative and seeds else 1.0) or 1.0
    diffs = [sign * (ra[s] - rb[s]) / scale for s in seeds]
    iv = paired_interval(diffs, th.level)
    out.update(seeds=seeds, differences=diffs, interval="paired t")
    if iv is None:
        out.update(verdict=INCONCLUSIVE, note="fewer than 2 common seeds: no interval")
        return out
    w = welch_interval([sign * ra[s] / scale for s in seeds], [sign * rb[s] / scale for s in seeds], th.level)
    out.update(better_by=iv.estimate, ci=[iv.lo, iv.hi], se=iv.se, detectable=iv.detectable,
               welch_ci=[w[1], w[2]] if w else None, verdict=_sign_verdict(iv.lo, iv.hi, -margin))
    return out


def claim_c4(values, mim: str, sup: str, th: Thresholds) -> Claim:
    per = {t: task_compare(values, t, mim, sup, th) for t in ("keypoints", "depth", "track")}
    vs = [p["verdict"] for p in per.values()]
    verdict = HOLDS if all(v == HOLDS for v in vs) else NOT if any(v == NOT for v in vs) else INCONCLUSIVE
    return Claim("C4", "MIM is better on keypoints (AP), depth (RMSE) and tracking (SUC)", verdict,
                 f"per task: per-seed difference {mim} - {sup} in the task's better direction; paired t 95% interval",
                 "per task holds if the interval lies above 0, does_not_hold if below; C4 holds if all three hold, "
                 "does_not_hold if any does not", per)


def claim_c5(values, mim: str, sup: str, th: Thresholds) -> Claim:
    c = task_compare(values, "classify", mim, sup, th, margin=th.noninferiority)
    return Claim("C5", "MIM is at least as good on fine-grained classification", c["verdict"],
                 f"top-1, per-seed difference {mim} - {sup}; paired t 95% interval",
                 f"non-inferiority: holds if the interval lies above -{th.noninferiority}, does_not_hold if below",
                 {"classify": c})


def claim_c6(values, sup: str, sup_drop: str, th: Thresholds, k: int) -> Claim:
    per = {t: task_compare(values, t, sup_drop, sup, th, margin=th.relative_margin, relative=True)
           for t in ("keypoints", "depth")}
    vs = [p["verdict"] for p in per.values()]
    verdict = HOLDS if all(v == HOLDS for v in vs) else NOT if any(v == NOT for v in vs) else INCONCLUSIVE
    return Claim("C6", f"dropping the supervised model's last {k} blocks does not hurt geometric tasks", verdict,
                 f"per-seed relative change of the task metric, {sup_drop} vs {sup}, in the better direction; paired t "
                 "95% interval",
                 f"non-inferiority per task: holds if the interval lies above -{th.relative_margin:.0%}, "
                 "does_not_hold if below; C6 holds if keypoints and depth both hold", per)


def gate_model(label: str, *, loss_ratio: float | None, loss_ratio_max: float, attn_change: float,
               attn_change_min: float, cka_to_init: float | None, cka_to_init_max: float) -> dict[str, Any]:
    """'Trained enough to be compared': the loss is well below a trivial predictor's, and the attention or the
    representations moved away from the random-init control."""
    problems = []
    if loss_ratio is not None and not loss_ratio < loss_ratio_max:
        problems.append(f"final loss is {loss_ratio:.2f}x the trivial predictor's (needs < {loss_ratio_max})")
    attn_moved = attn_change >= attn_change_min
    repr_moved = cka_to_init is not None and cka_to_init <= cka_to_init_max
    if not (attn_moved or repr_moved):
        problems.append(f"attention and representations barely moved from random init (max |Δ normalised "
                        f"distance| {attn_change:.3f} < {attn_change_min}; same-layer CKA to init "
                        f"{'n/a' if cka_to_init is None else f'{cka_to_init:.3f}'} > {cka_to_init_max})")
    return {"ok": not problems, "reason": "; ".join(problems), "loss_ratio": loss_ratio,
            "attention_change": attn_change, "cka_to_init": cka_to_init}


def evaluate_claims(*, dist_norm, dist_reps, kl, kl_reps, cka_within, downstream, gates, mim: str, sup: str,
                    sup_drop: str | None, drop_k: int, th: Thresholds | None = None) -> dict[str, Claim]:
    th = th or Thresholds()
    claims = {
        "C1": _gated(claim_c1(dist_norm, dist_reps, mim, sup, th), gates, (mim, sup)),
        "C2": _gated(claim_c2(kl, kl_reps, mim, sup, th), gates, (mim, sup)),
        "C3": _gated(claim_c3(cka_within, mim, sup, th), gates, (mim, sup)),
        "C4": _gated(claim_c4(downstream, mim, sup, th), gates, (mim, sup)),
        "C5": _gated(claim_c5(downstream, mim, sup, th), gates, (mim, sup)),
    }
    if sup_drop is not None:
        claims["C6"] = _gated(claim_c6(downstream, sup, sup_drop, th, drop_k), gates, (sup,))
    return claims
