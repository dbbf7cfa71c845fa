"""Paper-style figures of a probe result (PNG, 120 dpi).

Uses ``matplotlib.figure.Figure`` with ``FigureCanvasAgg`` directly, never ``pyplot``, so it neither depends on nor
changes the global backend or state that other matplotlib users in the process rely on.

Figures (``make_figures`` returns ``name -> path``; a figure whose data is absent from the result is skipped):
  attention_distance  one panel per model: a dot per head vs layer, the layer-mean line, a dashed line at the
                      uniform-attention distance (Xie et al. 2023, Fig. 2 style)
  head_kl, head_js    one panel per model: per-head diversity dots and layer-mean line (Fig. 3 style)
  entropy, nmi        layer means of all models in one panel, with 95% CI bands when the result has them
  cka_within          layer x layer linear CKA of each model with itself (Fig. 4 style)
  cka_across          layer x layer CKA of each unordered pair of different models (only "A/B" of A/B, B/A)
Models whose layers carry a ``stage`` (Swin-like) get stage boundaries drawn and labelled on their block axis.
CKA colours are fixed to [0, 1]; values outside (unbiased CKA may be slightly negative) keep their value and are
drawn in distinct under/over colours shown as the colour bar's end triangles.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.transforms import blended_transform_factory
from matplotlib.ticker import MaxNLocator

from mimlab.report import tables as T
from mimlab.utils.io import atomic_path

DPI = 120
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
    "attention_distance": ("attention_distance_px", "Attention distance per head"),
    "head_kl": ("head_kl", "Head diversity (KL)"),
    "head_js": ("head_js", "Head diversity (Jensen-Shannon)"),
}
LAYER_MEAN_FIGURES = {
    "entropy": ("entropy", "Attention entropy (layer mean)"),
    "nmi": ("nmi", "Normalised mutual information (layer mean)"),
}


# ---------------------------------------------------------------------------------------------------------------
# Small pure helpers
# ---------------------------------------------------------------------------------------------------------------
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
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, facecolor="white")
    return path


def _style(ax: Axes) -> None:
    ax.grid(True, color="#e5e5e5", linewidth=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


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


def _panel_grid(n: int, panel_w: float = 3.3, panel_h: float = 3.0) -> tuple[Figure, list[Axes]]:
    ncols = min(n, MAX_COLS)
    nrows = math.ceil(n / ncols)
    fig = _new_figure(0.5 + panel_w * ncols, 0.6 + panel_h * nrows)
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _title(result: dict, label: str) -> str:
    m = T.models(result)[label]
    return plain(label) + ("\n(random init)" if m.get("random_init") else "")


def per_head_figure(result: dict, metric: str, title: str) -> Figure:
    """One panel per model (shared y): a dot per head at each layer, the layer-mean line with its CI band, and for
    attention distance a dashed line at the model's uniform-attention distance."""
    labels = [lab for lab in T.models(result) if _has_metric(result, lab, metric)]
    colors = model_colors(list(T.models(result)))
    fig, axes = _panel_grid(len(labels))
    any_ci = any_uniform = False
    for k, (ax, label) in enumerate(zip(axes, labels)):
        ls = T.layers(result, label)
        xs, ys = [], []
        for i, layer in enumerate(ls):
            if metric in layer:
                vals = T.head_values(result, label, i, metric)
                xs += [i] * len(vals)
                ys += vals
        ax.scatter(xs, ys, s=16, color=colors[label], alpha=0.6, linewidths=0, label="head", zorder=3)
        means, cis = _layer_means(result, label, metric)
        idx = list(range(len(ls)))
        if any(ci is not None for ci in cis):
            lo = [ci[0] if ci else math.nan for ci in cis]
            hi = [ci[1] if ci else math.nan for ci in cis]
            ax.fill_between(idx, lo, hi, color="#333333", alpha=0.18, linewidth=0, zorder=2)
            any_ci = True
        ax.plot(idx, means, color="#222222", linewidth=1.6, marker="o", markersize=3, zorder=4)
        if metric == "attention_distance_px":
            u = T.models(result)[label].get("uniform_distance_px")
            if u is not None:
                u = float(u)
                ax.axhline(u, color="#666666", linestyle="--", linewidth=1.2, zorder=1)
                ax.text(0.99, u, f"uniform {u:.1f} px", transform=blended_transform_factory(ax.transAxes, ax.transData),
                        ha="right", va="bottom", fontsize=7, color="#444444", zorder=5,
                        bbox={"facecolor": "white", "alpha": 0.75, "edgecolor": "none", "pad": 1})
                any_uniform = True
        _style(ax)
        _depth_axis(ax, ls)
        ax.set_title(_title(result, label), fontsize=10, pad=14 if stage_spans(ls) else 6)
        ax.set_xlabel(_depth_label(ls))
        if k % MAX_COLS == 0:
            ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    handles = [Line2D([], [], linestyle="", marker="o", markersize=5, color="#777777", alpha=0.7, label="head"),
               Line2D([], [], color="#222222", linewidth=1.6, marker="o", markersize=3, label="layer mean")]
    if any_ci:
        handles.append(Patch(color="#333333", alpha=0.18, linewidth=0, label="95% CI of layer mean"))
    if any_uniform:
        handles.append(Line2D([], [], color="#666666", linestyle="--", linewidth=1.2, label="uniform attention"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    return fig


def layer_mean_figure(result: dict, metric: str, title: str) -> Figure:
    """All models in one panel: the layer mean of ``metric`` vs layer, with 95% CI bands when present."""
    labels = [lab for lab in T.models(result) if _has_metric(result, lab, metric)]
    colors = model_colors(list(T.models(result)))
    fig = _new_figure(6.0, 3.6)
    ax = fig.subplots()
    staged = False
    for label in labels:
        ls = T.layers(result, label)
        means, cis = _layer_means(result, label, metric)
        idx = list(range(len(ls)))
        c = colors[label]
        name = plain(label) + (" (random init)" if T.models(result)[label].get("random_init") else "")
        ax.plot(idx, means, color=c, linewidth=1.8, marker="o", markersize=3.5, label=name, zorder=3)
        if any(ci is not None for ci in cis):
            lo = [ci[0] if ci else math.nan for ci in cis]
            hi = [ci[1] if ci else math.nan for ci in cis]
            ax.fill_between(idx, lo, hi, color=c, alpha=0.2, linewidth=0, zorder=2)
        if stage_spans(ls):
            staged = True
            _depth_axis(ax, ls, color=c)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _style(ax)
    ax.set_xlabel("layer / block index" if staged and len(labels) > 1 else
                  ("block index" if staged else "layer index"))
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.set_title(title, fontsize=11, pad=14 if staged else 6)
    ax.legend(fontsize=8, loc="best", framealpha=0.85)
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
def make_figures(result: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Draw every figure the result has data for into ``out_dir/<name>.png``; returns ``{name: path}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    T.check_result(result)  # a bad result fails before any file is written
    labels = list(T.models(result))
    figs: dict[str, Path] = {}

    def emit(name: str, fig: Figure) -> None:
        figs[name] = _save(fig, out / f"{name}.png")

    for name, (metric, title) in PER_HEAD_FIGURES.items():
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
