"""Paper-style figures of a probe result: PNG (which report.html embeds) and, on request, PDF / SVG copies.

Uses ``matplotlib.figure.Figure`` with ``FigureCanvasAgg`` directly, never ``pyplot``, so it neither depends on nor
changes the global backend or state that other matplotlib users in the process rely on.

Figures (``make_figures`` returns ``name -> PNG path``; a figure whose data is absent from the result is skipped):
  attention_distance  one panel per model: a dot per head vs layer (coloured by head index), the layer-mean line,
                      distance in units of the uniform-attention distance with 1.0 (= uniform) dashed, the axis
                      from 0 (Xie et al. 2023, Fig. 2 style)
  head_kl, head_js    one panel per model: per-head diversity dots and layer-mean line (Fig. 3 style)
  entropy, nmi        layer means of all models in one panel, with 95% CI bands when the result has them; entropy
                      with its maximum ln K (uniform attention over K patch keys) dashed
  cka_within          layer x layer linear CKA of each model with itself (Fig. 4 style)
  cka_across          layer x layer CKA of each unordered pair of different models (only "A/B" of A/B, B/A)
Models whose layers carry a ``stage`` (Swin-like) get stage boundaries drawn and labelled on their block axis.
CKA colours are fixed to [0, 1]; values outside (unbiased CKA may be slightly negative) keep their value and are
drawn in distinct under/over colours shown as the colour bar's end triangles.
Axes of non-negative statistics start at 0 and never use offset notation, so an untrained network's flat profile
looks flat. ``loss_figure`` draws pretraining loss curves from ``metrics.csv`` files (``read_loss_curve``);
``paired_differences_figure`` a study's per-seed differences behind claims C4-C6.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from matplotlib import colormaps, rc_context
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.transforms import blended_transform_factory
from matplotlib.ticker import MaxNLocator

from mimlab.engine.logger import read_loss_log
from mimlab.report import tables as T
from mimlab.report.options import DPI, FigureOptions
from mimlab.utils.io import atomic_path

HEAD_CMAP = "viridis"  # head index -> colour in per-head scatters
# Okabe & Ito (2008) colour-blind-safe palette, most distinguishable first (yellow last: weak on white).
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
CKA_UNDER = "#D55E00"  # vermillion: CKA < 0 (absent from viridis, distinct from its dark end)
CKA_OVER = "#000000"  # black: CKA > 1 (distinct from viridis' yellow end)
MAX_COLS = 4  # per-model panels per row
ANNOTATE_MAX_LAYERS = 8  # write CKA values into the cells of matrices this small
# Colour limits of CKA heatmaps: [0, 1] widened by a rounding tolerance, so that a float64 diagonal of
# 1 + 1e-15 is not painted in the "over" colour; the data themselves are never clamped.
CKA_TOL = 1e-6

METRIC_LABELS = {
    "attention_distance_px": "mean attention distance (px)",
    "attention_distance_norm": "attention distance / uniform",
    "head_kl": "KL to other heads (nats)",
    "head_js": "JS to other heads (nats)",
    "entropy": "attention entropy (nats)",
    "prefix_mass": "attention mass on prefix tokens",
    "nmi": "normalised mutual information",
}
PER_HEAD_FIGURES = {
    "attention_distance": ("attention_distance_norm", "Attention distance per head"),
    "head_kl": ("head_kl", "Head diversity (KL)"),
    "head_js": ("head_js", "Head diversity (Jensen-Shannon)"),
}
NONNEGATIVE = {"attention_distance_px", "attention_distance_norm", "head_kl", "head_js", "entropy", "nmi", "prefix_mass"}
LAYER_MEAN_FIGURES = {
    "entropy": ("entropy", "Attention entropy (layer mean)"),
    "nmi": ("nmi", "Normalised mutual information (layer mean)"),
}


# ---------------------------------------------------------------------------------------------------------------
# Small pure helpers
# ---------------------------------------------------------------------------------------------------------------
def zero_based_limits(lo: float, hi: float, min_top: float = 0.0, margin: float = 0.06) -> tuple[float, float]:
    """y limits of a non-negative statistic: from 0 (or below, for negative data) to above the data and
    ``min_top``, so that a tiny spread is drawn as tiny rather than stretched over the whole panel."""
    top = max(hi, min_top)
    top = top * (1 + margin) if top > 0 else 1.0
    bottom = 0.0 if lo >= 0 else lo - margin * (top - lo)
    return bottom, top


def head_cmap() -> ListedColormap:
    """viridis without its pale yellow end (weak on white), head 0 darkest."""
    base = colormaps[HEAD_CMAP]
    return ListedColormap([base(0.85 * i / 255) for i in range(256)], name="heads")


def head_offsets(num_heads: int, width: float = 0.5) -> list[float]:
    """x offsets that spread a layer's heads over ``width`` around the layer index, head 0 leftmost."""
    if num_heads <= 1:
        return [0.0] * num_heads
    return [width * (h / (num_heads - 1) - 0.5) for h in range(num_heads)]


def running_mean(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start): m_t = mean(v[max(0, t-w+1) .. t])."""
    out, acc = [], 0.0
    for t, v in enumerate(values):
        acc += v
        if t >= window:
            acc -= values[t - window]
        out.append(acc / min(t + 1, window))
    return out


def max_entropy(result: dict, label: str) -> float | None:
    """ln K of a model's layers (K patch keys, the entropy of uniform attention), if all its layers share it."""
    ks = {layer.get("num_patch_keys") for layer in T.layers(result, label)}
    if len(ks) != 1 or None in ks:
        return None
    return math.log(ks.pop())


def model_colors(labels: Sequence[str]) -> dict[str, str]:
    """One palette colour per model label, in model order (cycling after 8 models)."""
    return {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}


def stage_spans(layer_list: Sequence[dict]) -> list[tuple[int | None, int, int]]:
    """Runs of consecutive layers with the same ``stage``: [(stage, first_index, last_index)], [] if none is set."""
    if all(layer.get("stage") is None for layer in layer_list):
        return []
    spans: list[tuple[int | None, int, int]] = []
    for i, layer in enumerate(layer_list):
        s = layer.get("stage")
        if spans and spans[-1][0] == s:
            spans[-1] = (s, spans[-1][1], i)
        else:
            spans.append((s, i, i))
    return spans


def plain(text: str, max_len: int = 40) -> str:
    """A user string made safe for matplotlib text: shortened to ``max_len`` characters (with an ellipsis) and
    '$' escaped so it is never parsed as mathtext."""
    text = str(text)
    if len(text) > max_len:
        text = text[: max_len - 1] + "\u2026"
    return text.replace("$", r"\$")


def cka_pairs(result: dict) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(within, across): the (A, A) keys in model order, and one (A, B) per unordered pair of different models
    (A before B in model order; the stored B/A is used, transposed, when A/B is missing)."""
    mats = T.cka_matrices(result)
    labels = list(T.models(result))
    within = [(a, a) for a in labels if (a, a) in mats]
    across = []
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            if (a, b) in mats or (b, a) in mats:
                across.append((a, b))
    return within, across


def _cka_matrix(mats: dict, a: str, b: str) -> list[list[float]]:
    if (a, b) in mats:
        return mats[(a, b)]
    m = mats[(b, a)]
    return [list(col) for col in zip(*m)]


def _layer_means(result: dict, label: str, metric: str) -> tuple[list[float], list[tuple[float, float] | None]]:
    """Stored layer means (falling back to the mean over heads, the definition, when a layer has none) and CIs."""
    means, cis = [], []
    for i, layer in enumerate(T.layers(result, label)):
        m = T.layer_mean(result, label, i, metric)
        if math.isnan(m) and metric in layer:
            vals = [v for v in T.head_values(result, label, i, metric) if not math.isnan(v)]
            m = sum(vals) / len(vals) if vals else math.nan
        means.append(m)
        cis.append(T.layer_ci(result, label, i, metric))
    return means, cis


def _has_metric(result: dict, label: str, metric: str) -> bool:
    return any(metric in layer or metric in (layer.get("layer_mean") or {}) for layer in T.layers(result, label))


# ---------------------------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------------------------
def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, stem: Path, options: FigureOptions = FigureOptions()) -> Path:
    """``stem.<format>`` for each of ``options.formats``, cropped to the drawn content (legends outside the axes
    included); returns the PNG's path."""
    for fmt in options.formats:
        path = stem.with_suffix(f".{fmt}")
        with atomic_path(path) as tmp, rc_context({"svg.hashsalt": "mimlab"}):   # SVG ids: same data, same bytes
            fig.savefig(tmp, format=fmt, dpi=options.dpi, facecolor="white", bbox_inches="tight", pad_inches=0.08,
                        metadata=_METADATA[fmt])
    return stem.with_suffix(".png")


_METADATA = {"png": None, "pdf": {"Creator": "mimlab", "CreationDate": None},   # no dates: same data, same bytes
             "svg": {"Creator": "mimlab", "Date": None}}


def _style(ax: Axes) -> None:
    ax.grid(True, color="#e5e5e5", linewidth=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for axis in (ax.xaxis, ax.yaxis):
        fmt = axis.get_major_formatter()
        if hasattr(fmt, "set_useOffset"):
            fmt.set_useOffset(False)   # "+4.158" above the axis hides that the spread is tiny


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _depth_axis(ax: Axes, layer_list: Sequence[dict], axis: str = "x", color: str = "#555555",
                line_color: str | None = None) -> None:
    """Integer ticks; for staged models, dotted lines at stage boundaries and 'stage s' labels (Swin-like)."""
    (ax.xaxis if axis == "x" else ax.yaxis).set_major_locator(MaxNLocator(integer=True))
    spans = stage_spans(layer_list)
    if not spans:
        return
    trans = ax.get_xaxis_transform() if axis == "x" else ax.get_yaxis_transform()
    for k, (stage, first, last) in enumerate(spans):
        if k > 0:
            line = ax.axvline if axis == "x" else ax.axhline
            line(first - 0.5, color=line_color or color, linestyle=":", linewidth=1.1, zorder=1)
        short = (last - first + 1) / len(layer_list) < 0.2  # too narrow for "stage s" at 8 pt in a small panel
        label = ("no stage" if stage is None else f"S{stage}" if short else f"stage {stage}")
        centre = (first + last) / 2
        if axis == "x":
            ax.text(centre, 1.0, label, transform=trans, ha="center", va="bottom", fontsize=8, color=color)
        else:
            ax.text(1.0, centre, label, transform=trans, ha="left", va="center", fontsize=8, color=color,
                    rotation=-90)


def _depth_label(layer_list: Sequence[dict]) -> str:
    return "block index" if stage_spans(layer_list) else "layer index"


def _panel_grid(n: int, panel_w: float = 3.3, panel_h: float = 3.0, sharey: bool = True) -> tuple[Figure, list[Axes]]:
    ncols = min(n, MAX_COLS)
    nrows = math.ceil(n / ncols)
    fig = _new_figure(0.5 + panel_w * ncols, 0.6 + panel_h * nrows)
    axes = fig.subplots(nrows, ncols, sharey=sharey, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _title(result: dict, label: str) -> str:
    m = T.models(result)[label]
    return plain(label) + ("\n(random init)" if m.get("random_init") else "")


def per_head_figure(result: dict, metric: str, title: str) -> Figure:
    """One panel per model (shared y from 0): a dot per head at each layer, coloured by head index and spread
    around the layer index, the layer-mean line with its CI band, and for normalised attention distance a dashed
    line at 1.0, the uniform-attention distance (given in pixels in each panel's title)."""
    labels = [lab for lab in T.models(result) if _has_metric(result, lab, metric)]
    fig, axes = _panel_grid(len(labels))
    max_heads = max((len(T.head_values(result, lab, i, metric)) for lab in labels
                     for i, layer in enumerate(T.layers(result, lab)) if metric in layer), default=1)
    cmap, norm = head_cmap(), Normalize(0, max(max_heads - 1, 1))
    any_ci = any_uniform = False
    data: list[float] = [1.0] if metric == "attention_distance_norm" else []
    for k, (ax, label) in enumerate(zip(axes, labels)):
        ls = T.layers(result, label)
        xs, ys, cs = [], [], []
        for i, layer in enumerate(ls):
            if metric in layer:
                vals = T.head_values(result, label, i, metric)
                xs += [i + o for o in head_offsets(len(vals))]
                ys += vals
                cs += list(range(len(vals)))
        ax.scatter(xs, ys, s=16, c=cs, cmap=cmap, norm=norm, alpha=0.85, linewidths=0, zorder=3)
        means, cis = _layer_means(result, label, metric)
        idx = list(range(len(ls)))
        if any(ci is not None for ci in cis):
            lo = [ci[0] if ci else math.nan for ci in cis]
            hi = [ci[1] if ci else math.nan for ci in cis]
            ax.fill_between(idx, lo, hi, color="#333333", alpha=0.18, linewidth=0, zorder=2)
            data += _finite(hi)
            any_ci = True
        ax.plot(idx, means, color="#222222", linewidth=1.6, marker="o", markersize=3, zorder=4)
        data += _finite(ys) + _finite(means)
        u = T.models(result)[label].get("uniform_distance_px")
        sub = ""
        if metric == "attention_distance_norm":
            ax.axhline(1.0, color="#666666", linestyle="--", linewidth=1.2, zorder=1)
            any_uniform = True
            if u is not None:
                sub = f"\nuniform = {float(u):.1f} px"
        elif metric == "attention_distance_px" and u is not None:
            ax.axhline(float(u), color="#666666", linestyle="--", linewidth=1.2, zorder=1)
            data.append(float(u))
            any_uniform = True
        _style(ax)
        _depth_axis(ax, ls)
        ax.set_title(_title(result, label) + sub, fontsize=10, pad=14 if stage_spans(ls) else 6)
        ax.set_xlabel(_depth_label(ls))
        if k % MAX_COLS == 0:
            ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    if data and metric in NONNEGATIVE:
        axes[0].set_ylim(*zero_based_limits(min(data), max(data),
                                            min_top=1.1 if metric == "attention_distance_norm" else 0.0))
    handles = [Line2D([], [], linestyle="", marker="o", markersize=5, color=cmap(0.5), label="head"),
               Line2D([], [], color="#222222", linewidth=1.6, marker="o", markersize=3, label="layer mean")]
    if any_ci:
        handles.append(Patch(color="#333333", alpha=0.18, linewidth=0, label="95% CI of layer mean"))
    if any_uniform:
        handles.append(Line2D([], [], color="#666666", linestyle="--", linewidth=1.2, label="uniform attention"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 2 * len(axes)), fontsize=8,
               frameon=False)
    if max_heads > 1:
        cb = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes, shrink=0.8, pad=0.02,
                          ticks=sorted({0, max_heads - 1, (max_heads - 1) // 2}))
        cb.set_label("head index", fontsize=8)
        cb.ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=11)
    return fig


def layer_mean_figure(result: dict, metric: str, title: str) -> Figure:
    """All models in one panel, the axis from 0: the layer mean of ``metric`` vs layer, with 95% CI bands when
    present; for entropy a dashed line at its maximum ln K per model (K patch keys: uniform attention)."""
    labels = [lab for lab in T.models(result) if _has_metric(result, lab, metric)]
    colors = model_colors(list(T.models(result)))
    fig = _new_figure(6.0, 3.6)
    ax = fig.subplots()
    staged = False
    data: list[float] = []
    refs: dict[float, tuple[float, list[str]]] = {}   # ln K (rounded, to merge equal K) -> (ln K, colours)
    for label in labels:
        ls = T.layers(result, label)
        means, cis = _layer_means(result, label, metric)
        idx = list(range(len(ls)))
        c = colors[label]
        name = plain(label) + (" (random init)" if T.models(result)[label].get("random_init") else "")
        ax.plot(idx, means, color=c, linewidth=1.8, marker="o", markersize=3.5, label=name, zorder=3)
        data += _finite(means)
        if any(ci is not None for ci in cis):
            lo = [ci[0] if ci else math.nan for ci in cis]
            hi = [ci[1] if ci else math.nan for ci in cis]
            ax.fill_between(idx, lo, hi, color=c, alpha=0.2, linewidth=0, zorder=2)
            data += _finite(lo) + _finite(hi)
        if metric == "entropy":
            h_max = max_entropy(result, label)
            if h_max is not None:
                refs.setdefault(round(h_max, 12), (h_max, []))[1].append(c)
        if stage_spans(ls):
            staged = True
            _depth_axis(ax, ls, color=c)
    for h_max, cs in refs.values():
        c = cs[0] if len(refs) > 1 else "#666666"
        ax.axhline(h_max, color=c, linestyle="--", linewidth=1.1, zorder=1,
                   label=f"maximum ln K = {h_max:.2f} (uniform)")
        data.append(h_max)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _style(ax)
    if data and metric in NONNEGATIVE:
        ax.set_ylim(*zero_based_limits(min(data), max(data)))
    ax.set_xlabel("layer / block index" if staged and len(labels) > 1 else
                  ("block index" if staged else "layer index"))
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.set_title(title, fontsize=11, pad=14 if staged else 6)
    ax.legend(fontsize=8, loc="best", framealpha=0.85)
    return fig


@dataclass
class LossCurve:
    """One pretraining run's loss by step (``metrics.csv``), and the trivial predictor's loss when known."""
    steps: list[int]
    losses: list[float]
    trivial: float | None = None


def read_loss_curve(path: str | os.PathLike, trivial: float | None = None) -> LossCurve:
    """The step and loss columns of an engine ``metrics.csv`` (rows without a finite loss skipped)."""
    log = read_loss_log(path)
    return LossCurve(log.steps, log.losses, trivial)


def loss_figure(curves: dict[str, LossCurve], title: str = "Pretraining loss") -> Figure:
    """One panel per run (own y scale, from 0): the loss of every step (faint), its running mean over 5% of the
    steps, and a dashed line at the trivial predictor's loss when known."""
    labels = [k for k, c in curves.items() if c.steps]
    colors = model_colors(labels)
    fig, axes = _panel_grid(max(len(labels), 1), panel_w=3.6, panel_h=2.8, sharey=False)
    for k, (ax, label) in enumerate(zip(axes, labels)):
        c = curves[label]
        ax.plot(c.steps, c.losses, color=colors[label], alpha=0.3, linewidth=0.8, zorder=2)
        window = max(1, len(c.losses) // 20)
        ax.plot(c.steps, running_mean(c.losses, window), color=colors[label], linewidth=1.8, zorder=3)
        data = list(c.losses)
        if c.trivial is not None:
            ax.axhline(c.trivial, color="#666666", linestyle="--", linewidth=1.1, zorder=1)
            ax.text(0.99, c.trivial, f"trivial predictor {c.trivial:.3g}", ha="right", va="bottom", fontsize=7,
                    color="#444444", transform=blended_transform_factory(ax.transAxes, ax.transData))
            data.append(c.trivial)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _style(ax)
        ax.set_ylim(*zero_based_limits(min(data), max(data)))
        ax.set_title(plain(label), fontsize=10)
        ax.set_xlabel("step")
        if k == 0:
            ax.set_ylabel("training loss")
    handles = [Line2D([], [], color="#777777", alpha=0.4, linewidth=0.8, label="per step"),
               Line2D([], [], color="#777777", linewidth=1.8, label="running mean (5% of steps)")]
    if any(curves[k].trivial is not None for k in labels):
        handles.append(Line2D([], [], color="#666666", linestyle="--", linewidth=1.1, label="trivial predictor"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    return fig


@dataclass
class PairedComparison:
    """One task comparison of a claim: per-seed differences in the better direction, their paired 95% interval,
    the rule's threshold (0, or -margin for non-inferiority) and the verdict."""
    name: str                  # e.g. "C4 keypoints"
    ylabel: str                # e.g. "simmim better by\n(rmse vs supervised)"
    seeds: list[int]
    differences: list[float]
    ci: tuple[float, float] | None
    threshold: float
    verdict: str
    color: str = "#555555"     # the verdict's colour (the report's badges)


def paired_differences_figure(comparisons: Sequence[PairedComparison],
                              title: str = "Per-seed paired differences (better direction)") -> Figure:
    """One panel per comparison: a dot per seed, the mean and its 95% interval as a bar at the right, 0 as a solid
    line and the rule's threshold dashed when it is not 0; the panel's frame coloured by the verdict."""
    fig, axes = _panel_grid(max(len(comparisons), 1), panel_w=2.6, panel_h=2.5, sharey=False)
    for ax, c in zip(axes, comparisons):
        color = c.color
        xs = list(range(len(c.differences)))
        ax.scatter(xs, c.differences, s=22, color="#333333", zorder=3)
        right = len(xs) + 0.3
        data = list(c.differences) + [0.0, c.threshold]
        if c.ci is not None:
            mean = sum(c.differences) / len(c.differences)
            ax.errorbar([right], [mean], yerr=[[mean - c.ci[0]], [c.ci[1] - mean]], fmt="D", color=color,
                        capsize=4, markersize=5, zorder=4)
            data += list(c.ci)
        ax.axhline(0.0, color="#444444", linewidth=0.9, zorder=1)
        if c.threshold != 0:
            ax.axhline(c.threshold, color="#444444", linestyle="--", linewidth=0.9, zorder=1)
        _style(ax)
        lo, hi = min(data), max(data)
        pad = 0.08 * (hi - lo or 1.0)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_xticks(xs + [right], [f"s{s}" for s in c.seeds] + ["95% CI"], fontsize=7)
        ax.set_title(f"{c.name}: {c.verdict.replace('_', ' ')}", fontsize=9, color=color)
        ax.set_ylabel(c.ylabel, fontsize=8)
        for side in ("left", "bottom"):
            ax.spines[side].set_color(color)
    handles = [Line2D([], [], color="#333333", marker="o", linestyle="", label="one seed"),
               Line2D([], [], color="#777777", marker="D", label="mean, 95% paired t interval"),
               Line2D([], [], color="#444444", linestyle="--", linewidth=0.9, label="non-inferiority threshold")]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    return fig


def _cka_panel(ax: Axes, mat: list[list[float]], result: dict, a: str, b: str):
    cmap = colormaps["viridis"].with_extremes(under=CKA_UNDER, over=CKA_OVER, bad="#bbbbbb")
    la, lb = len(mat), len(mat[0])
    im = ax.imshow(mat, cmap=cmap, vmin=-CKA_TOL, vmax=1.0 + CKA_TOL, origin="lower", interpolation="nearest",
                   aspect="equal" if la == lb else "auto")
    if max(la, lb) <= ANNOTATE_MAX_LAYERS:
        for i, row in enumerate(mat):
            for j, v in enumerate(row):
                dark = v > 1.0 + CKA_TOL or (-CKA_TOL <= v < 0.55)
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
    for axis, label in (("x", b), ("y", a)):
        ls = T.layers(result, label)
        _depth_axis(ax, ls, axis=axis, line_color="white")
    if a == b:
        ax.set_xlabel(_depth_label(T.layers(result, b)))
        ax.set_ylabel(_depth_label(T.layers(result, a)))
    else:
        ax.set_xlabel(f"{plain(b, 24)}: {_depth_label(T.layers(result, b))}")
        ax.set_ylabel(f"{plain(a, 24)}: {_depth_label(T.layers(result, a))}")
    return im


def cka_figure(result: dict, pairs: Sequence[tuple[str, str]], title: str) -> Figure:
    """One heatmap per (A, B) pair (rows = A's layers, columns = B's layers, origin lower left), shared colour bar
    fixed to [0, 1] with end triangles for values below 0 / above 1."""
    mats = T.cka_matrices(result)
    n = len(pairs)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig = _new_figure(0.9 + 3.3 * ncols, 1.3 + 3.3 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    im = None
    for ax, (a, b) in zip(axes, pairs):
        mat = _cka_matrix(mats, a, b)
        im = _cka_panel(ax, mat, result, a, b)
        flat = [v for r in mat for v in r if not math.isnan(v)]
        rng = f"min {min(flat):.3f}, max {max(flat):.3f}" if flat else "no values"
        name = plain(a) if a == b else f"{plain(a, 24)}\nvs {plain(b, 24)}"
        ax.set_title(f"{name}\n{rng}", fontsize=9, pad=14 if stage_spans(T.layers(result, b)) else 6)
    cb = fig.colorbar(im, ax=axes[:n], extend="both", shrink=0.85, label="linear CKA (unbiased)",
                      ticks=[0, 0.2, 0.4, 0.6, 0.8, 1.0])
    cb.ax.tick_params(labelsize=8)
    fig.suptitle(title, fontsize=11)
    return fig


def _has_token_norms(result: dict, label: str) -> bool:
    return all("token_norms" in layer for layer in T.layers(result, label))


def token_norm_figure(result: dict, title: str) -> Figure:
    """Per model, two panels. Left, by layer: the median and largest patch-token norm of a block's output and
    each prefix role's mean token norm (class token, registers, ...); right, where the high-norm patch tokens
    sit (the fraction of images in which each grid position is one) at the layer that has the most of them, with
    the attention mass each prefix role receives at that layer in the title."""
    labels = [lab for lab in T.models(result) if _has_token_norms(result, lab)]
    fig = _new_figure(8.6, 3.1 * len(labels) + 0.4)
    axes = fig.subplots(len(labels), 2, squeeze=False, gridspec_kw={"width_ratios": [1.6, 1.0]})
    for row, label in zip(axes, labels):
        ax, ax_map = row
        ls = T.layers(result, label)
        idx = list(range(len(ls)))
        tn = [layer["token_norms"] for layer in ls]
        ax.plot(idx, [t["patch_median"] for t in tn], color=PALETTE[0], marker="o", markersize=3, label="patch median")
        ax.plot(idx, [t["patch_max"] for t in tn], color=PALETTE[1], marker="o", markersize=3, label="patch max")
        roles = tn[0]["prefix"]["roles"]
        for ci, role in enumerate(dict.fromkeys(roles)):
            cols = [j for j, r in enumerate(roles) if r == role]
            vals = [sum(t["prefix"]["norm"][j] for j in cols) / len(cols) for t in tn]
            ax.plot(idx, vals, color=PALETTE[2 + ci % 5], linestyle="--", marker="s", markersize=3,
                    label=f"{role} token{'s (mean)' if len(cols) > 1 else ''}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(bottom=0)
        _style(ax)
        ax.set_xlabel(_depth_label(ls))
        ax.set_ylabel("token norm")
        ax.set_title(_title(result, label), fontsize=9)
        ax.legend(fontsize=7, loc="best", framealpha=0.85)
        worst = max(idx, key=lambda i: (tn[i]["outliers_per_image"], i))
        im = ax_map.imshow(tn[worst]["outlier_map"], cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
        masses = ", ".join(f"{m.split('_')[0]} {ls[worst]['layer_mean'][m]:.2f}" for m in
                           ("cls_mass", "dist_mass", "register_mass") if m in ls[worst].get("layer_mean", {}))
        ax_map.set_title(f"{T.layer_name(ls[worst], worst)}: {tn[worst]['outliers_per_image']:.2f} tokens per image "
                         f"> {tn[worst]['outlier_k']:g} x median" + (f"\nattention mass: {masses}" if masses else ""),
                         fontsize=8)
        ax_map.set_xticks([])
        ax_map.set_yticks([])
        fig.colorbar(im, ax=ax_map, shrink=0.8, label="fraction of images")
    fig.suptitle(title, fontsize=11)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------
def make_figures(result: dict, out_dir: str | os.PathLike, options: FigureOptions = FigureOptions(),
                 losses: dict[str, LossCurve] | None = None) -> dict[str, Path]:
    """Draw every figure the result has data for into ``out_dir/<name>.<format>`` (and ``loss`` from ``losses``);
    returns ``{name: PNG path}``."""
    out = Path(out_dir)
    T.check_result(result)  # a bad result fails before any file is written
    out.mkdir(parents=True, exist_ok=True)
    labels = list(T.models(result))
    figs: dict[str, Path] = {}

    def emit(name: str, fig: Figure) -> None:
        figs[name] = save_figure(fig, out / name, options)

    if losses and any(c.steps for c in losses.values()):
        emit("loss", loss_figure(losses))
    for name, (metric, title) in PER_HEAD_FIGURES.items():
        if not any(_has_metric(result, lab, metric) for lab in labels) and metric == "attention_distance_norm":
            metric = "attention_distance_px"   # a metrics.json without the normalised distance
        if any(_has_metric(result, lab, metric) for lab in labels):
            emit(name, per_head_figure(result, metric, title))
    for name, (metric, title) in LAYER_MEAN_FIGURES.items():
        if any(_has_metric(result, lab, metric) for lab in labels):
            emit(name, layer_mean_figure(result, metric, title))
    within, across = cka_pairs(result)
    if within:
        emit("cka_within", cka_figure(result, within, "Linear CKA between layers of each model"))
    if across:
        emit("cka_across", cka_figure(result, across, "Linear CKA between layers of different models"))
    if any(_has_token_norms(result, lab) for lab in labels):
        emit("token_norms", token_norm_figure(result, "Token norms: high-norm patch tokens and registers"))
    return figs


def write_loss_figure(metrics_csv: str | os.PathLike, out_dir: str | os.PathLike, label: str,
                      options: FigureOptions = FigureOptions(), trivial: float | None = None) -> Path | None:
    """``out_dir/loss.<format>`` from one training log; None when the log has no finite loss."""
    curve = read_loss_curve(metrics_csv, trivial)
    if not curve.steps:
        return None
    return save_figure(loss_figure({label: curve}), Path(out_dir) / "loss", options)
