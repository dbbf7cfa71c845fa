"""The study's summary (`summary.json`), tidy tables and self-contained `report.html`."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

from mimlab.probe.attention_stats import METRICS
from mimlab.reproduce.claims import (TASK_METRIC, Thresholds, evaluate_claims, gate_model,
                                     mean_offdiag, t975)
from mimlab.reproduce.pipeline import load_json
from mimlab.reproduce.presets import StudyConfig
from mimlab.utils.io import atomic_write_json, atomic_write_text

VERDICT_COLOUR = {"holds": "#1b7837", "does_not_hold": "#b00020", "inconclusive": "#8a6d00"}


def _layer_means(metrics: dict, label: str, metric: str) -> np.ndarray:
    return np.array([layer["layer_mean"][metric] for layer in metrics["models"][label]["layers"]])


def _mean_ci(values: list[float]) -> dict[str, Any]:
    v = np.asarray(values, float)
    out: dict[str, Any] = {"mean": float(v.mean()) if len(v) else None, "n": int(len(v)), "values": v.tolist()}
    if len(v) >= 2:
        half = t975(len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
        out["ci"] = [float(v.mean() - half), float(v.mean() + half)]
    return out


def build_summary(cfg: StudyConfig, pre: dict[str, dict], probe: dict[str, str], baseline: dict[str, Any],
                  downstream: dict[str, dict[str, list[dict]]], records: dict) -> dict[str, Any]:
    metrics = load_json(probe["metrics"])
    reps_file = np.load(probe["replicates"])
    reps = {k: reps_file[k] for k in reps_file.files}
    labels = list(metrics["models"])
    di, ki = METRICS.index("attention_distance_norm"), METRICS.index("head_kl")
    dist = {k: _layer_means(metrics, k, "attention_distance_norm") for k in labels}
    kl = {k: _layer_means(metrics, k, "head_kl") for k in labels}
    cka_within = {k: np.asarray(metrics["cka"][f"{k}/{k}"]) for k in labels}

    # "trained enough" gates against the random-init control
    gates: dict[str, dict[str, Any]] = {}
    from mimlab.pretrain.data import parse_data_spec

    spec = parse_data_spec(cfg.pretrain_data)
    num_classes = spec.params.get("classes")
    for m in cfg.methods:
        info = pre.get(m, {})
        loss = info.get("final_loss")
        ratio = None
        if loss is not None:
            if m == "simmim" and baseline.get("mean_colour_l1"):
                ratio = loss / baseline["mean_colour_l1"]
            elif m == "supervised" and num_classes:
                ratio = loss / math.log(num_classes)
            elif m == "mae":
                ratio = loss / 1.0          # norm-pix MSE of predicting each patch's mean: 1
        attn_change = float(np.max(np.abs(dist[m] - dist["random"])))
        cross = metrics["cka"].get(f"{m}/random")
        cka_init = float(np.mean(np.diag(np.asarray(cross)))) if cross is not None else None
        gates[m] = gate_model(m, loss_ratio=ratio, loss_ratio_max=cfg.gate_loss_ratio, attn_change=attn_change,
                              attn_change_min=cfg.gate_attention_change, cka_to_init=cka_init,
                              cka_to_init_max=cfg.gate_cka_to_init)

    # downstream: main metric per model/task over seeds
    values: dict[str, dict[str, list[float]]] = {}
    table: list[dict[str, Any]] = []
    for label, tasks in downstream.items():
        for task, runs in tasks.items():
            metric, higher = TASK_METRIC[task]
            vals = [r["metrics"][metric] for r in runs]
            values.setdefault(label, {})[task] = vals
            base = [r["baseline"][metric] for r in runs]
            table.append({"model": label, "task": task, "metric": metric, "higher_is_better": higher,
                          **{f"model_{k}": v for k, v in _mean_ci(vals).items()},
                          "baseline": float(np.mean(base)),
                          "all_metrics": {k: float(np.mean([r["metrics"][k] for r in runs])) for k in runs[0]["metrics"]}})
    drop_label = f"supervised-drop{cfg.ablation_blocks}" if cfg.ablation_blocks else None
    claims = evaluate_claims(
        dist_norm=dist, dist_reps={k: v[:, :, di] for k, v in reps.items()}, kl=kl,
        kl_reps={k: v[:, :, ki] for k, v in reps.items()}, cka_within=cka_within, downstream=values, gates=gates,
        mim="simmim", sup="supervised", sup_drop=drop_label if drop_label in values else None,
        drop_k=cfg.ablation_blocks, th=Thresholds())
    mask = (pre.get("simmim") or {}).get("mask") or {}
    return {
        "scale": cfg.scale_line(),
        "config": cfg.to_dict(),
        "claims": {k: c.to_dict() for k, c in claims.items()},
        "gates": gates,
        "pretrain": {m: {k: v for k, v in info.items() if k != "losses_head"} for m, info in pre.items()},
        "simmim_mask": mask,
        "simmim_avg_dist_px": mask.get("avg_dist_px"),
        "simmim_mean_colour_l1": baseline.get("mean_colour_l1"),
        "probe": {"metrics": probe["metrics"], "num_images": metrics["num_images"],
                  "layer_means": {k: {"attention_distance_norm": dist[k].tolist(), "head_kl": kl[k].tolist(),
                                      "cka_mean_offdiag": mean_offdiag(cka_within[k])} for k in labels}},
        "downstream": table,
        "stages": {name: {"skipped": r.skipped, "seconds": round(r.seconds, 2), "key": r.key[:12]}
                   for name, r in records.items()},
    }


# ------------------------------------------------------------------------------------------------------- HTML
def _verdict_badge(v: str) -> str:
    return (f'<span style="background:{VERDICT_COLOUR.get(v, "#555")};color:#fff;border-radius:3px;'
            f'padding:0 .4rem;white-space:nowrap">{v.replace("_", " ")}</span>')


def _fmt_values(values: Any, digits: int = 4) -> str:
    from mimlab.report.html import esc, fmt

    if isinstance(values, dict):
        return "<br>".join(f"<b>{esc(k)}</b>: {_fmt_values(v, digits)}" for k, v in values.items()
                           if k not in ("values",))
    if isinstance(values, (list, tuple)):
        return "[" + ", ".join(_fmt_values(v, digits) for v in values) + "]"
    return esc(fmt(values, digits))


def write_study_report(summary: dict[str, Any], probe: dict[str, str], out: Path) -> dict[str, Path]:
    from mimlab.report.figures import make_figures
    from mimlab.report.html import CSS, _table, esc, figures_html, fmt, model_table, summary_table

    out.mkdir(parents=True, exist_ok=True)
    metrics = load_json(probe["metrics"])
    figures = make_figures(metrics, out / "figures")
    claims_rows = [[esc(cid), esc(c["text"]), _verdict_badge(c["verdict"]), esc(c["statistic"]),
                    _fmt_values(c["values"]), esc(c["rule"]), esc(c.get("reason", ""))]
                   for cid, c in summary["claims"].items()]
    gate_rows = [[esc(m), _verdict_badge("holds" if g["ok"] else "inconclusive").replace(
        "holds", "trained enough").replace("inconclusive", "not trained enough"), esc(fmt(g.get("loss_ratio"))),
        esc(fmt(g.get("attention_change"))), esc(fmt(g.get("cka_to_init"))), esc(g.get("reason", ""))]
        for m, g in summary["gates"].items()]
    down_rows = []
    for row in summary["downstream"]:
        ci = row.get("model_ci")
        down_rows.append([esc(row["model"]), esc(row["task"]), esc(row["metric"] + (" ↑" if row["higher_is_better"]
                                                                                   else " ↓")),
                          esc(fmt(row["model_mean"])) + (f' <span class="ci">[{fmt(ci[0])}, {fmt(ci[1])}]</span>'
                                                         if ci else ""),
                          esc(str(row["model_n"])), esc(fmt(row["baseline"]))])
    pre_rows = [[esc(m), esc(fmt(i.get("steps"))), esc(fmt(i.get("final_loss"))), esc(fmt(i.get("img_per_s")))]
                for m, i in summary["pretrain"].items()]
    stage_rows = [[esc(n), "cached" if s["skipped"] else "ran", esc(fmt(s["seconds"])), esc(s["key"])]
                  for n, s in summary["stages"].items()]
    html = "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>mimlab reproduce: Revealing the Dark Secrets of MIM</title>", f"<style>\n{CSS}\n</style>", "</head>",
        "<body>",
        "<h1>Do the paper's findings hold for these models?</h1>",
        '<p class="sub">Xie et al., <i>Revealing the Dark Secrets of Masked Image Modeling</i> (CVPR 2023), '
        "claim by claim, for SimMIM vs supervised pretraining of the same architecture from the same "
        "initialisation with the same budget.</p>",
        f'<div class="warning"><strong>Scale</strong> — {esc(summary["scale"])}</div>',
        "<h2>Claims</h2>",
        _table(["id", "claim", "verdict", "statistic", "numbers", "rule", "note"], claims_rows),
        "<h2>Were the models trained enough to be compared?</h2>",
        "<p>Loss ratio: final training loss / a trivial predictor's (SimMIM: each image's visible mean colour, "
        f"L1 = {esc(fmt(summary.get('simmim_mean_colour_l1')))}; supervised: ln(classes); MAE: 1). Attention "
        "change: largest |Δ normalised attention distance| of a layer vs the random-init control. CKA to init: "
        "mean same-layer CKA with the random-init control.</p>",
        _table(["model", "gate", "loss ratio", "attention change", "CKA to init", "reason"], gate_rows),
        f"<p>SimMIM masking: {esc(str(summary.get('simmim_mask')))}; AvgDist "
        f"{esc(fmt(summary.get('simmim_avg_dist_px')))} px (mean distance from a masked pixel to the nearest "
        "visible one; the SimMIM paper's sweet spot is 10-20 px at 224 px).</p>",
        "<h2>Downstream</h2>",
        "<p>Mean over seeds with a 95% t interval (≥ 2 seeds); the baseline is the trivial predictor on the same "
        "split (majority class, box-centre keypoints, mean depth, stationary box).</p>",
        _table(["model", "task", "metric", "mean [95% CI]", "seeds", "trivial baseline"], down_rows),
        "<h2>Pretraining</h2>",
        _table(["method", "steps", "final loss (last 10%)", "img/s"], pre_rows),
        "<h2>Attention and representations</h2>",
        model_table(metrics), summary_table(metrics), figures_html(figures, metrics),
        "<h2>Stages</h2>",
        _table(["stage", "this run", "seconds", "key"], stage_rows),
        "</body>", "</html>"])
    paths = {"report": out / "report.html", "summary": out / "summary.json"}
    atomic_write_text(paths["report"], html + "\n")
    atomic_write_json(paths["summary"], summary)
    paths["downstream_csv"] = out / "downstream.csv"
    with open(paths["downstream_csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "task", "metric", "mean", "ci_low", "ci_high", "seeds", "baseline"])
        for r in summary["downstream"]:
            ci = r.get("model_ci") or [None, None]
            w.writerow([r["model"], r["task"], r["metric"], r["model_mean"], ci[0], ci[1], r["model_n"], r["baseline"]])
    paths["claims_csv"] = out / "claims.csv"
    with open(paths["claims_csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["claim", "verdict", "statistic", "rule", "reason"])
        for cid, c in summary["claims"].items():
            w.writerow([cid, c["verdict"], c["statistic"], c["rule"], c.get("reason", "")])
    return paths
