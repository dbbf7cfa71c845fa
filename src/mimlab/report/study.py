"""The study's self-contained `report.html` (and `claims.csv`, `downstream.csv`) from its `summary.json` dict and
the probe's metrics.json: claims with verdicts, gates, the downstream table and the paper-style figures."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from mimlab.utils.io import atomic_write_json, atomic_write_text, load_json

VERDICT_COLOUR = {"holds": "#1b7837", "does_not_hold": "#b00020", "inconclusive": "#8a6d00"}


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
