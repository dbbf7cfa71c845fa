"""A self-contained HTML report of a probe result: one file, inline CSS, figures as base64 PNG data URIs, no
scripts and no external requests. Every string taken from the result is escaped with ``html.escape``."""
from __future__ import annotations

import base64
import html
import json
import math
import os
import shlex
from pathlib import Path
from typing import Any, Iterable

from mimlab.errors import MimlabError
from mimlab.report import tables as T
from mimlab.report.options import FigureOptions
from mimlab.utils.io import atomic_path

RANDOM_INIT_WARNING = "random initialisation: these numbers describe an untrained network"

# One sentence per figure stating what is plotted (definitions from the project's reading of the paper, PAPER.md).
CAPTIONS: dict[str, str] = {
    "loss": (
        "Training loss of each pretraining by step (faint: every step; solid: running mean over 5% of the steps), "
        "read from its metrics.csv, with the trivial predictor's loss of the 'trained enough' gate dashed (SimMIM: "
        "each image's visible mean colour; supervised: ln(classes))."),
    "attention_distance": (
        "Attention distance of a query i is sum_j A[i,j] * ||g_i - g_j|| (pixels between patch centres, prefix "
        "tokens dropped and rows renormalised), averaged over queries and images for each head (dots, coloured by "
        "head index), divided by the distance of uniform attention on the same grid (given in pixels per panel): "
        "1.0 (dashed) is uniform attention, smaller is more local. The line is the layer mean; the axis starts at 0."),
    "head_kl": (
        "Head diversity of head h is the mean over queries and images of 1/(H-1) * sum over the other heads h' of "
        "KL(A_h[i] || A_h'[i]) in nats, shown per head (dots) with the mean over the layer's heads (line)."),
    "head_js": (
        "Head diversity measured with the bounded Jensen-Shannon divergence instead of KL: the mean over queries, "
        "images and other heads of JS(A_h[i], A_h'[i]) in nats, per head (dots) and layer mean (line)."),
    "entropy": (
        "Entropy of a head is the mean over queries of the entropy (nats) of its attention row over the K patch "
        "keys; lines are the mean over the heads of each layer, bands the 95% bootstrap interval over images when "
        "it was computed; dashed: the maximum ln K, reached by uniform attention."),
    "nmi": (
        "Normalised mutual information between query and key under uniform queries (Park et al. 2023), mean over "
        "heads per layer; values near 0 mean every query attends alike (attention collapse)."),
    "token_norms": (
        "Norms of the tokens each block outputs (the residual stream), averaged over images: the median and largest "
        "patch-token norm and each prefix token's (class token, registers), by layer; right, where the patch tokens "
        "whose norm exceeds k times their image's median sit (the high-norm 'artifact' tokens of Darcet et al. 2024), "
        "as the fraction of images in which each grid position is one, at the layer with most of them."),
    "cka_within": (
        "Linear CKA between the block outputs of two layers of the same model, with the unbiased HSIC estimator "
        "accumulated over minibatches of images (Nguyen et al. 2021); colours span [0, 1], values below 0 are "
        "drawn in vermillion and above 1 in black, unclamped."),
    "cka_across": (
        "Linear CKA (unbiased HSIC, Nguyen et al. 2021) between a layer of one model (rows) and a layer of another "
        "(columns), computed on the same images in the same order; colours span [0, 1], values below 0 vermillion, "
        "above 1 black."),
}

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1a1a1a;
 max-width:1280px;margin:1.5rem auto;padding:0 1.2rem;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem} h2{font-size:1.25rem;margin-top:2rem;border-bottom:1px solid #ccc}
.sub{color:#555;margin-top:0}
.warning{border:3px solid #b00020;background:#fde7e9;color:#7a0014;padding:.7rem 1rem;margin:1rem 0;
 font-weight:600;border-radius:4px;overflow-wrap:anywhere}
.warning strong{text-transform:uppercase;letter-spacing:.03em}
table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}
th,td{border:1px solid #d0d0d0;padding:.25rem .55rem;text-align:left;vertical-align:top}
th{background:#f2f2f2} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.group th{background:#e6eef7;text-align:left}
table.tasks{font-size:.85em;margin:0} .scroll{overflow-x:auto;max-width:100%}
.ci{color:#666;font-size:.8em} code{font-size:.9em} code.path{word-break:break-all} .nowrap{white-space:nowrap}
figure{margin:1.2rem 0;padding:0} figure img{max-width:100%;height:auto;border:1px solid #e2e2e2}
figcaption{color:#333;font-size:.92rem;max-width:70rem;margin-top:.3rem}
.badge{background:#b00020;color:#fff;border-radius:3px;padding:0 .35rem;font-size:.8em;white-space:nowrap}
""".strip()


def esc(x: Any) -> str:
    """Escape any value for HTML text or an attribute value."""
    return html.escape(str(x), quote=True)


def fmt(x: Any, digits: int = 4) -> str:
    """A number with ``digits`` significant digits; None -> an em dash; NaN -> 'nan'; other values as text."""
    if x is None:
        return "\u2014"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return f"{x:.{digits}g}"


def _dims(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return " \u00d7 ".join(str(x) for x in v)
    return fmt(v)


def _table(header: Iterable[str], rows: Iterable[Iterable[str]], numeric: frozenset[int] | set[int] = frozenset()) -> str:
    """An HTML table; cells are already-escaped HTML fragments."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "\n".join(
        "<tr>" + "".join(f'<td class="num">{c}</td>' if j in numeric else f"<td>{c}</td>" for j, c in enumerate(r))
        + "</tr>" for r in rows)
    return (f'<div class="scroll"><table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>'
            "</div>")           # a wide table scrolls on a narrow screen instead of widening the page


def _kv_table(d: dict) -> str:
    rows = []
    for k, v in d.items():
        if k == "command" and isinstance(v, list):
            v = " ".join(shlex.quote(str(a)) for a in v)
        elif not isinstance(v, str):
            v = json.dumps(v, sort_keys=True)  # exact numbers, JSON spelling of true/false/null
        rows.append([f"<code>{esc(k)}</code>", esc(v)])
    return _table(["key", "value"], rows)


# ---------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------
def warnings_html(result: dict) -> str:
    """A loud warning box for every model with ``random_init`` true."""
    out = []
    for label, m in T.models(result).items():
        if m.get("random_init"):
            out.append(f'<div class="warning" role="alert"><strong>Warning</strong> &mdash; model '
                       f"<code>{esc(label)}</code>: {esc(RANDOM_INIT_WARNING)}.</div>")
    return "\n".join(out)


def _depth_text(ls: list[dict]) -> str:
    stages = [s for s in dict.fromkeys(layer.get("stage") for layer in ls) if s is not None]
    if stages:
        return f"{len(ls)} blocks in {len(stages)} stages"
    return f"{len(ls)} layers"


def model_table(result: dict) -> str:
    header = ["model", "arch", "family", "checkpoint", "sha256", "depth", "heads", "prefix tokens", "grid",
              "patch size", "image size", "uniform distance (px)"]
    rows = []
    for label, m in T.models(result).items():
        ls = T.layers(result, label)
        heads = sorted({layer["num_heads"] for layer in ls})
        sha = m.get("checkpoint_sha256")
        sha_html = f'<code title="{esc(sha)}">{esc(str(sha)[:12])}&hellip;</code>' if sha else "\u2014"
        ckpt = m.get("checkpoint")
        name = f"<code>{esc(label)}</code>"
        if m.get("random_init"):
            name += ' <span class="badge">random init</span>'
        rows.append([
            name, esc(m.get("arch", "\u2014")), esc(m.get("family", "\u2014")),
            f'<code class="path">{esc(ckpt)}</code>' if ckpt else "\u2014 (none)", sha_html, esc(_depth_text(ls)),
            esc(" \u2013 ".join(str(h) for h in (heads[0], heads[-1])) if len(heads) > 1 else str(heads[0])),
            esc(fmt(m.get("num_prefix_tokens"))), *(f'<span class="nowrap">{esc(_dims(m.get(k)))}</span>'
                                                     for k in ("grid", "patch_size", "img_size")),
            esc(fmt(m.get("uniform_distance_px"))),
        ])
    return _table(header, rows, numeric={7, 11})


def summary_positions(n: int) -> list[tuple[str, int]]:
    """(position name, layer index) of the first, middle (index n // 2) and last layer."""
    return [("first", 0), ("middle", n // 2), ("last", n - 1)]


def summary_table(result: dict) -> str:
    """Layer means (with 95% CI when present) of every metric at the first, middle and last layer of each model."""
    parts = ["<table>", "<thead><tr><th>metric</th><th>first layer</th><th>middle layer</th><th>last layer</th>"
             "</tr></thead>", "<tbody>"]
    for label in T.models(result):
        ls = T.layers(result, label)
        pos = summary_positions(len(ls))
        names = ", ".join(f"{p} = {T.layer_name(ls[i], i)}" for p, i in pos)
        parts.append(f'<tr class="group"><th colspan="4"><code>{esc(label)}</code> '
                     f"<span class=\"ci\">({esc(names)})</span></th></tr>")
        metrics = list(dict.fromkeys(m for layer in ls for m in T.layer_mean_names(layer)))
        metrics = [m for m in T.HEAD_METRICS if m in metrics] + [m for m in metrics if m not in T.HEAD_METRICS]
        for metric in metrics:
            cells = []
            for _, i in pos:
                cell = esc(fmt(T.layer_mean(result, label, i, metric)))
                ci = T.layer_ci(result, label, i, metric)
                if ci is not None:
                    cell += f' <span class="ci">[{esc(fmt(ci[0]))}, {esc(fmt(ci[1]))}]</span>'
                cells.append(f'<td class="num">{cell}</td>')
            parts.append(f"<tr><td><code>{esc(metric)}</code></td>{''.join(cells)}</tr>")
    parts += ["</tbody>", "</table>"]
    return "\n".join(parts)


def png_data_uri(path: str | os.PathLike) -> str:
    """``data:image/png;base64,...`` for a PNG file (checked by its signature)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise MimlabError(f"report figure {p}: cannot read it ({e.strerror})") from e
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise MimlabError(f"report figure {p}: not a PNG file")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def figures_html(figures: dict[str, Path], result: dict) -> str:
    parts = []
    feat = (result.get("cka_config") or {}).get("features")
    for k, (name, path) in enumerate(figures.items(), 1):
        caption = CAPTIONS.get(name, name)
        if name.startswith("cka") and feat:
            caption += f" Features: {feat}."
        parts.append(f'<figure id="fig-{esc(name)}"><img src="{png_data_uri(path)}" alt="{esc(name)}">'
                     f"<figcaption><strong>Figure {k} ({esc(name)}).</strong> {esc(caption)}</figcaption></figure>")
    return "\n".join(parts) if parts else "<p>No figures.</p>"


def provenance_html(result: dict) -> str:
    top = {k: result.get(k) for k in ("mimlab_version", "seed", "num_images")}
    prov = result.get("provenance") or {}
    return _kv_table(top) + ("\n" + _kv_table(prov) if prov else "")


# ---------------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------------
def maps_html(maps: dict[str, list[Path]], out_dir: Path | None) -> str:
    """The attention-map section: per model, the first image's maps of its first query and its rollout inline,
    every other PNG linked (relative to the report)."""
    if not maps:
        return ""
    parts = ["<h2>Attention maps</h2>",
             "<p>From the same capture as the statistics (no second forward). Each panel: one head's attention of "
             "the query to the patch tokens, over the image; rollout: Abnar &amp; Zuidema (2020). All files under "
             "<code>maps/</code>.</p>"]
    for label, paths in maps.items():
        first = [p for p in paths if "_img0_" in p.name]
        shown = first[:1] + [p for p in first if p.name.endswith("_rollout.png")]
        parts.append(f"<h3>{esc(label)}</h3>")
        for p in shown:
            parts.append(f'<figure><img src="{png_data_uri(p)}" alt="{esc(p.name)}">'
                         f"<figcaption>{esc(p.name)}</figcaption></figure>")
        rel = [p.relative_to(out_dir).as_posix() if out_dir is not None else p.name for p in paths]
        parts.append("<p>" + ", ".join(f'<a href="{esc(r)}">{esc(Path(r).name)}</a>' for r in rel) + "</p>")
    return "\n".join(parts)


def report_html(result: dict, figures: dict[str, Path], title: str = "mimlab probe report",
                maps: dict[str, list[Path]] | None = None, out_dir: Path | None = None) -> str:
    """The report as one HTML5 string."""
    T.check_result(result)
    n_models = len(T.models(result))
    cka_cfg = result.get("cka_config")
    config = result.get("config") or {}
    sections = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title>",
        f"<style>\n{CSS}\n</style>",
        "</head>",
        "<body>",
        f"<h1>{esc(title)}</h1>",
        f'<p class="sub">{n_models} model{"s" if n_models != 1 else ""}, '
        f"{esc(fmt(result.get('num_images')))} images, seed {esc(fmt(result.get('seed')))}, "
        f"mimlab {esc(result.get('mimlab_version', '?'))}.</p>",
        warnings_html(result),
        "<h2>Models</h2>",
        model_table(result),
        "<h2>Summary: layer means</h2>",
        "<p>Mean over heads (and images) at the first, middle and last layer; brackets: 95% bootstrap interval "
        "over images when computed. Full tables: <code>heads.csv</code>, <code>layers.csv</code>, "
        "<code>cka.csv</code>.</p>",
        summary_table(result),
        "<h2>Figures</h2>",
        figures_html(figures, result),
        maps_html(maps or {}, out_dir),
        "<h2>CKA configuration</h2>",
        _kv_table(cka_cfg) if cka_cfg else "<p>CKA was not computed.</p>",
        "<h2>Probe conventions</h2>",
        _kv_table(config) if config else "<p>No conventions recorded.</p>",
        "<h2>Provenance</h2>",
        provenance_html(result),
        "</body>",
        "</html>",
    ]
    return "\n".join(s for s in sections if s) + "\n"


def write_report(result: dict, out_dir: str | os.PathLike, figures: dict[str, Path] | None = None,
                 title: str = "mimlab probe report", maps: dict[str, list[Path]] | None = None,
                 figure_options: FigureOptions = FigureOptions()) -> Path:
    """Write ``out_dir/report.html``. ``figures=None`` draws them first into ``out_dir/figures``; ``{}`` means none."""
    out = Path(out_dir)
    if figures is None:
        from mimlab.report.figures import make_figures

        figures = make_figures(result, out / "figures", figure_options)
    text = report_html(result, figures, title=title, maps=maps, out_dir=out)
    path = out / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def render_all(result: dict, out_dir: str | os.PathLike,
               figure_options: FigureOptions = FigureOptions()) -> dict[str, Any]:
    """Tables, figures (``out_dir/figures``, in ``figure_options``' formats) and ``report.html``; returns
    ``{"tables": [Path], "figures": {name: PNG path}, "report": Path}``."""
    from mimlab.report.figures import make_figures

    out = Path(out_dir)
    T.check_result(result)
    paths_tables = T.write_tables(result, out)
    from mimlab.report.maps import write_map_figures

    figs = make_figures(result, out / "figures", figure_options)
    maps = write_map_figures(result, out)
    report = write_report(result, out, figures=figs, maps=maps)
    return {"tables": paths_tables, "figures": figs, "maps": maps, "report": report}
