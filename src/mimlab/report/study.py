"""The study's self-contained `report.html` (and `claims.csv`, `downstream.csv`) from its `summary.json` dict and
the probe's metrics.json: claims with verdicts, gates, the downstream table and the paper-style figures."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Sequence

from mimlab.utils.io import atomic_write_json, atomic_write_text, load_json

VERDICT_COLOUR = {"holds": "#1b7837", "does_not_hold": "#b00020", "inconclusive": "#8a6d00"}


def _verdict_badge(v: str) -> str:
    return (f'<span style="background:{VERDICT_COLOUR.get(v, "#555")};color:#fff;border-radius:3px;'
            f'padding:0 .4rem;white-space:nowrap">{v.replace("_", " ")}</span>')


def interval_decimals(lo: float, hi: float) -> int:
    """Decimals that show an interval at its own precision: two significant digits of its half-width
    (half-width 0.0123 -> 4 decimals, 1.7 -> 1, 23 -> 0); 4 for a zero-width interval."""
    half = abs(hi - lo) / 2
    if not math.isfinite(half) or half == 0:
        return 4
    return max(0, 1 - math.floor(math.log10(half)))


def round_to(x: float | None, decimals: int) -> str:
    """`x` with `decimals` decimals ('-0.000' shown as '0.000'); None -> an em dash."""
    if x is None:
        return "\u2014"
    text = f"{x:.{decimals}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def with_interval(x: float | None, ci: Sequence[float] | None) -> str:
    """'0.180 [0.177, 0.183]': the value and its interval at the interval's precision; 4 significant digits
    without an interval."""
    from mimlab.report.html import fmt

    if ci is None or len(ci) != 2 or x is None:
        return fmt(x)
    d = interval_decimals(ci[0], ci[1])
    return f"{round_to(x, d)} [{round_to(ci[0], d)}, {round_to(ci[1], d)}]"


def _is_task_table(values: Any) -> bool:
    return isinstance(values, dict) and bool(values) and all(isinstance(v, dict) and "metric" in v
                                                             for v in values.values())


def _task_subtable(values: dict[str, dict[str, Any]]) -> str:
    """C4-C6: task | metric | each model's mean over seeds (n) | difference in the better direction [CI] | verdict."""
    from mimlab.report.html import esc, fmt

    rows, models = [], None
    for task, v in values.items():
        models = [k[len("mean_"):] for k in v if k.startswith("mean_")] or [
            k for k, x in v.items() if isinstance(x, list) and k != "ci"]
        cells = [esc(task), esc(v["metric"] + (" \u2191" if v.get("higher_is_better") else " \u2193"))]
        for m in models:
            n = len(v.get(m) or [])
            cells.append(f"{esc(fmt(v.get(f'mean_{m}')))} <span class=\"ci\">(n={n})</span>")
        diff = v.get("better_by")
        cells.append(esc(with_interval(diff, v.get("ci"))) if diff is not None else esc(v.get("note", "\u2014")))
        det = v.get("detectable")
        cells.append(esc(round_to(det, interval_decimals(*v["ci"])) if det is not None else "\u2014"))
        cells.append(_verdict_badge(v.get("verdict", "inconclusive")))
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = ["task", "metric", *[f"{m} mean" for m in (models or [])], "\u0394 better [95% paired CI]",
            "detectable (80% power)", "verdict"]
    return ('<table class="tasks"><tr>' + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"
            + "".join(rows) + "</table>")


def paired_comparisons(claims: dict[str, Any]) -> list[Any]:
    """The per-task comparisons of C4-C6 that have per-seed differences, for the paired-differences figure."""
    from mimlab.report.figures import PairedComparison

    out = []
    for cid, c in claims.items():
        if not _is_task_table(c.get("values")):
            continue
        for task, v in c["values"].items():
            if not v.get("differences"):
                continue
            a, b = v.get("compared", ["", ""])
            unit = f"{v['metric']}, relative to {b}" if v.get("relative") else f"{v['metric']} vs {b}"
            out.append(PairedComparison(name=f"{cid} {task}", ylabel=f"{a} better by\n({unit})",
                                        seeds=v["seeds"],
                                        differences=v["differences"], ci=tuple(v["ci"]) if v.get("ci") else None,
                                        threshold=v.get("threshold", 0.0), verdict=v.get("verdict", "inconclusive"),
                                        color=VERDICT_COLOUR.get(v.get("verdict", "inconclusive"), "#555555")))
    return out


def _fmt_values(values: Any) -> str:
    """A claim's numbers as a reader wants them: C1-C3 as 'name: value [CI]' lines at the interval's precision,
    C4-C6 as a per-task sub-table; never Python literals."""
    from mimlab.report.html import esc, fmt

    if _is_task_table(values):
        return _task_subtable(values)
    if not isinstance(values, dict):
        return esc(fmt(values))
    ci = values.get("ci")
    shared = interval_decimals(*ci) if ci else None       # the values a difference is of, at its precision
    lines = []
    for k, v in values.items():
        if k in ("ci", "values") or k.endswith("_ci") or k == "verdict_before_gate":
            continue
        own = values.get(f"{k}_ci") or (ci if k == "delta" else None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            text = with_interval(float(v), own) if own or shared is None else round_to(float(v), shared)
            lines.append(f"<b>{esc(k)}</b>: {esc(text)}")
        else:
            lines.append(f"<b>{esc(k)}</b>: {esc(str(v))}")
    if "difference_ci" in values:
        d = values["difference_ci"]
        lines.append(f"<b>difference</b>: [{esc(round_to(d[0], interval_decimals(*d)))}, "
                     f"{esc(round_to(d[1], interval_decimals(*d)))}]")
    if "verdict_before_gate" in values:
        lines.append(f"<b>before the gate</b>: {esc(str(values['verdict_before_gate']).replace('_', ' '))}")
    return "<br>".join(lines)


def mask_text(mask: dict[str, Any] | None) -> str:
    """The SimMIM mask record as a sentence."""
    if not mask:
        return "\u2014"
    cells = mask.get("mask_cells") or ["?", "?"]
    return (f"{mask.get('mask_patch_size')} px cells on a {cells[0]}x{cells[1]} grid, {mask.get('masked_cells')} "
            f"masked (ratio {mask.get('mask_ratio')}, {100 * float(mask.get('masked_fraction', 0)):.1f}% of the "
            f"image), encoder patch {mask.get('patch_size')} px")


GATE_PREFIX = "not trained enough to compare"


def gated_models(claim: dict[str, Any], gates: dict[str, Any]) -> list[str]:
    """The models whose failed gate made a claim inconclusive: its `gated_by` list, or, in a summary written before
    that field existed, the models its reason cites ('... — simmim: ...; supervised: ...')."""
    if "gated_by" in claim:
        return list(claim["gated_by"])
    reason = claim.get("reason", "")
    if not reason.startswith(GATE_PREFIX):
        return []
    return [m for m, g in gates.items() if not g.get("ok") and f"{m}:" in reason]


def gates_box(gates: dict[str, Any]) -> str:
    """One box above the claims table: each model that failed its gate, with why (said once, not per claim)."""
    from mimlab.report.html import esc

    failed = {m: g for m, g in gates.items() if not g.get("ok")}
    if not failed:
        return ""
    items = "".join(f"<li><b>{esc(m)}</b>: {esc(g.get('reason', ''))}</li>" for m, g in failed.items())
    return (f'<div class="warning"><strong>Gate</strong> — {GATE_PREFIX}: a claim that uses one of these models is '
            f"inconclusive whatever its numbers (shown as measured).<ul>{items}</ul></div>")


def loss_curves(summary: dict[str, Any]) -> dict[str, Any]:
    """Each pretrained method's loss by step, read from the metrics.csv beside its model, with the trivial
    predictor's loss of its gate; methods without a log (imported checkpoints) left out."""
    from mimlab.report.figures import read_loss_curve

    curves = {}
    for m, info in summary["pretrain"].items():
        log = Path(str(info.get("model", ""))).parent / "metrics.csv"
        if m == "random" or info.get("imported") or not log.is_file():
            continue
        curves[m] = read_loss_curve(log, summary.get("gates", {}).get(m, {}).get("trivial_loss"))
    return curves


def _rate(info: dict[str, Any]) -> str:
    """img/s of a pretraining, marked when the run was one logging interval (its warm-up included)."""
    rate = info.get("img_per_s")
    if rate is None:
        return "\u2014"
    return fmt_rate(rate) + (" (incl. warm-up)" if info.get("img_per_s_with_warmup") else "")


def fmt_rate(rate: float) -> str:
    return f"{rate:.0f}" if rate >= 100 else f"{rate:.1f}"


def write_study_report(summary: dict[str, Any], probe: dict[str, str], out: Path,
                       figure_options: Any = None) -> dict[str, Path]:
    from mimlab.report.figures import make_figures, paired_differences_figure, save_figure
    from mimlab.report.html import CSS, _table, esc, figures_html, fmt, model_table, png_data_uri, summary_table
    from mimlab.report.options import FigureOptions

    out.mkdir(parents=True, exist_ok=True)
    metrics = load_json(probe["metrics"])
    options = figure_options or FigureOptions()
    figures = make_figures(metrics, out / "figures", options, losses=loss_curves(summary))
    paired = paired_comparisons(summary["claims"])
    paired_html = ""
    if paired:
        png = save_figure(paired_differences_figure(paired), out / "figures" / "paired_differences", options)
        paired_html = (f'<figure id="fig-paired_differences"><img src="{png_data_uri(png)}" alt="paired differences">'
                       "<figcaption><strong>Paired differences.</strong> Claims C4-C6 task by task: one dot per "
                       "transfer seed (the same seed gives both models the same batches, augmentation and head "
                       "initialisation), the mean with its 95% paired t interval at the right, 0 solid and the "
                       "non-inferiority threshold dashed; the title gives the verdict. A task is decided when "
                       "its interval clears the threshold.</figcaption></figure>")
    claims_rows = []
    for cid, c in summary["claims"].items():
        gated = gated_models(c, summary["gates"])
        tag = f"gated: {', '.join(gated)} (see above)" if gated else c.get("reason", "")
        claims_rows.append([esc(cid), esc(c["text"]), _verdict_badge(c["verdict"]), esc(c["statistic"]),
                            _fmt_values(c["values"]), esc(c["rule"]), esc(tag)])
    gates_once = gates_box(summary["gates"])
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
    pre_rows = [[esc(m), esc(fmt(i.get("steps"))), esc(fmt(i.get("final_loss"))), esc(_rate(i))]
                for m, i in summary["pretrain"].items() if m != "random"]
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
        "<h2>Claims</h2>", gates_once,
        _table(["id", "claim", "verdict", "statistic", "numbers", "rule", "note"], claims_rows), paired_html,
        "<h2>Were the models trained enough to be compared?</h2>",
        "<p>Loss ratio: final training loss / a trivial predictor's (SimMIM: each image's visible mean colour, "
        f"L1 = {esc(fmt(summary.get('simmim_mean_colour_l1')))}; supervised: ln(classes); MAE: 1). Attention "
        "change: largest |Δ normalised attention distance| of a layer vs the random-init control. CKA to init: "
        "mean same-layer CKA with the random-init control.</p>",
        _table(["model", "gate", "loss ratio", "attention change", "CKA to init", "reason"], gate_rows),
        f"<p>SimMIM masking: {esc(mask_text(summary.get('simmim_mask')))}; AvgDist "
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
