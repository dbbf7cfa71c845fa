"""Tables, figures and HTML report of a probe result, on a synthetic result dict with hand-chosen values."""
from __future__ import annotations

import base64
import csv
import math
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from mimlab.errors import MimlabError
from mimlab.report import tables as T

METRICS = ("attention_distance_px", "attention_distance_norm", "head_kl", "head_js", "entropy", "prefix_mass", "nmi")
VIT = "vit<script>alert('x')</script> & co"  # hostile label: must be escaped, and it contains a '/'
SWIN = "swin-t"
NEG_CKA = -0.0123456789012345  # unbiased CKA may be slightly negative


# ---------------------------------------------------------------------------------------------------------------
# Fixture builder
# ---------------------------------------------------------------------------------------------------------------
def _head_value(metric: str, model: int, layer: int, head: int) -> float:
    """Deterministic, distinct, plausible values (irrational-ish so CSV round-trips are a real test)."""
    base = {"attention_distance_px": 12.0 + 9.0 * layer + 4.5 * head,
            "attention_distance_norm": (12.0 + 9.0 * layer + 4.5 * head) / 80.0,
            "head_kl": 2.0 / (1 + layer) + 0.3 * head,
            "head_js": 0.3 / (1 + layer) + 0.05 * head,
            "entropy": 1.5 + 0.2 * layer + 0.1 * head,
            "prefix_mass": 0.0 if model == 1 else 0.05 + 0.02 * layer + 0.01 * head,
            "nmi": 0.4 - 0.05 * layer + 0.01 * head}[metric]
    return base + (0.0 if metric == "prefix_mass" and model == 1 else math.sqrt(2) * 1e-3 * (model + 1))


def _layer(metric_model: int, index: int, name: str, heads: int, stage: int | None, with_ci: bool) -> dict:
    layer: dict = {"name": name, "stage": stage, "num_heads": heads}
    for m in METRICS:
        layer[m] = [_head_value(m, metric_model, index, h) for h in range(heads)]
    layer["layer_mean"] = {m: sum(layer[m]) / heads for m in METRICS}
    if with_ci:
        layer["ci"] = {m: {"low": [v - 0.01 for v in layer[m]], "high": [v + 0.01 for v in layer[m]]}
                       for m in METRICS}
        layer["layer_ci"] = {m: [layer["layer_mean"][m] - 0.02, layer["layer_mean"][m] + 0.03] for m in METRICS}
    return layer


def _cka(la: int, lb: int, offset: float) -> list[list[float]]:
    return [[1.0 - abs(i - j) * 0.2 - offset if (i != j or offset) else 1.0 for j in range(lb)] for i in range(la)]


def make_result() -> dict:
    """2 models: a 4-layer ViT-like (3 heads, 1 prefix token, random init, with CIs) and a Swin-like one
    (2 stages x 2 blocks with 2 and 4 heads, no CIs); CKA for all ordered pairs including one negative value."""
    vit_layers = [_layer(0, i, f"blocks.{i}", 3, None, True) for i in range(4)]
    swin_layers = [_layer(1, i, f"layers.{i // 2}.blocks.{i % 2}", 2 if i < 2 else 4, i // 2, False)
                   for i in range(4)]
    vs = _cka(4, 4, 0.1)
    vs[3][0] = NEG_CKA
    return {
        "mimlab_version": "0.1.0", "num_images": 32, "seed": 7,
        "provenance": {"python": "3.11", "torch": "2.x", "command": ["mimlab", "probe", "--seed", "7", "a b"]},
        "config": {"renormalise": True, "eps": 1e-8},
        "models": {
            VIT: {"arch": "vit_tiny_patch16_224", "checkpoint": None, "checkpoint_sha256": None, "random_init": True,
                  "family": "vit", "num_prefix_tokens": 1, "grid": [4, 4], "patch_size": [16, 16],
                  "img_size": [64, 64], "uniform_distance_px": 29.43, "layers": vit_layers},
            SWIN: {"arch": "swin_tiny", "checkpoint": "/ckpt/swin.safetensors", "checkpoint_sha256": "ab" * 32,
                   "random_init": False, "family": "swin", "num_prefix_tokens": 0, "grid": [8, 8],
                   "patch_size": [4, 4], "img_size": [32, 32], "uniform_distance_px": 13.1, "layers": swin_layers},
        },
        "cka": {f"{VIT}/{VIT}": _cka(4, 4, 0.0), f"{SWIN}/{SWIN}": _cka(4, 4, 0.0),
                f"{VIT}/{SWIN}": vs, f"{SWIN}/{VIT}": [list(c) for c in zip(*vs)]},
        "cka_config": {"features": "flatten", "batch_size": 16, "num_batches": 2, "estimator": "unbiased_minibatch"},
    }


@pytest.fixture
def result() -> dict:
    return make_result()


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    from mimlab.report.html import render_all

    res = make_result()
    out = tmp_path_factory.mktemp("report")
    pyplot_before = "matplotlib.pyplot" in sys.modules
    paths = render_all(res, out)
    return res, out, paths, pyplot_before


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------
def test_head_rows_count_and_values(result):
    rows = T.head_rows(result)
    assert len(rows) == (4 * 3 + (2 + 2 + 4 + 4)) * len(METRICS)  # 168
    r = [r for r in rows if r["model"] == SWIN and r["layer_index"] == 2 and r["head"] == 3
         and r["metric"] == "head_kl"]
    assert len(r) == 1
    assert r[0]["value"] == _head_value("head_kl", 1, 2, 3)
    assert (r[0]["stage"], r[0]["layer"], r[0]["ci_low"], r[0]["ci_high"]) == (1, "layers.1.blocks.0", None, None)
    v = [r for r in rows if r["model"] == VIT and r["layer_index"] == 1 and r["head"] == 2
         and r["metric"] == "entropy"][0]
    assert v["ci_low"] == _head_value("entropy", 0, 1, 2) - 0.01 and v["stage"] is None
    # canonical metric order within one (model, layer)
    assert [r["metric"] for r in rows[:3 * len(METRICS):3]] == list(METRICS)


def test_csv_round_trip_exact(rendered):
    res, out, paths, _ = rendered
    assert {p.name for p in paths["tables"]} >= {"heads.csv", "layers.csv", "cka.csv"}
    heads = _read_csv(out / "heads.csv")
    assert list(heads[0]) == list(T.HEAD_COLUMNS) and len(heads) == 168
    row = [r for r in heads if r["model"] == VIT and r["layer"] == "blocks.3" and r["head"] == "1"
           and r["metric"] == "attention_distance_px"][0]
    assert float(row["value"]) == res["models"][VIT]["layers"][3]["attention_distance_px"][1]
    assert float(row["ci_high"]) == res["models"][VIT]["layers"][3]["ci"]["attention_distance_px"]["high"][1]
    assert row["stage"] == "" and row["layer_index"] == "3"
    swin = [r for r in heads if r["model"] == SWIN]
    assert all(r["ci_low"] == "" for r in swin) and {r["stage"] for r in swin} == {"0", "1"}

    layers = _read_csv(out / "layers.csv")
    assert list(layers[0]) == list(T.LAYER_COLUMNS) and len(layers) == 8 * len(METRICS)
    lr = [r for r in layers if r["model"] == VIT and r["layer_index"] == "2" and r["metric"] == "nmi"][0]
    lm = res["models"][VIT]["layers"][2]["layer_mean"]["nmi"]
    assert float(lr["mean"]) == lm and float(lr["ci_low"]) == lm - 0.02 and float(lr["ci_high"]) == lm + 0.03

    cka = _read_csv(out / "cka.csv")
    assert list(cka[0]) == list(T.CKA_COLUMNS) and len(cka) == 4 * 16
    neg = [r for r in cka if float(r["cka"]) < 0]
    assert [(r["model_a"], r["model_b"], r["layer_a"], r["layer_b"]) for r in neg] == [
        (VIT, SWIN, "3", "0"), (SWIN, VIT, "0", "3")]
    assert float(neg[0]["cka"]) == NEG_CKA  # not clamped, full precision


def test_split_pair_with_slash_in_label():
    assert T.split_pair("a/b/c", ["a/b", "c"]) == ("a/b", "c")
    assert T.split_pair("a/b/c", ["a", "b/c"]) == ("a", "b/c")
    with pytest.raises(MimlabError, match="more than one way"):
        T.split_pair("a/b/c", ["a", "b/c", "a/b", "c"])
    with pytest.raises(MimlabError, match="'x/y'"):
        T.split_pair("x/y", ["a"])


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["models"][SWIN]["layers"][2]["head_kl"].pop(), r"models\['swin-t'\]\.layers\[2\]\.head_kl has 3"),
    (lambda r: r["models"][VIT]["layers"][0]["ci"]["entropy"]["low"].append(0.0), r"ci\.entropy\.low has 4"),
    (lambda r: r["cka"][f"{SWIN}/{SWIN}"].pop(), r"cka\['swin-t/swin-t'\] must be a 4 x 4"),
    (lambda r: r["models"][SWIN]["layers"][1].update(entropy=[1.0, "x"]), r"entropy\[1\]: expected a number"),
    (lambda r: r["models"][SWIN]["layers"][1].update(num_heads=0), r"layers\[1\]\.num_heads must be a positive"),
    (lambda r: r.update(models={}), "'models' is missing or empty"),
    (lambda r: r["cka"].update({"nobody/swin-t": []}), "not 'A/B' with A and B among the models"),
])
def test_bad_result_names_the_key(result, mutate, message, tmp_path):
    mutate(result)
    with pytest.raises(MimlabError, match=message):
        T.write_tables(result, tmp_path)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_missing_ci_and_none_values(result):
    for layer in result["models"][VIT]["layers"]:
        del layer["ci"], layer["layer_ci"]
    result["models"][VIT]["layers"][0]["nmi"][0] = None
    rows = T.head_rows(result)
    r = [r for r in rows if r["model"] == VIT and r["layer_index"] == 0 and r["head"] == 0 and r["metric"] == "nmi"]
    assert math.isnan(r[0]["value"]) and r[0]["ci_low"] is None
    assert all(r["ci_low"] is None for r in T.layer_rows(result))


# ---------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------
def test_stage_spans(result):
    from mimlab.report.figures import stage_spans

    assert stage_spans(result["models"][SWIN]["layers"]) == [(0, 0, 1), (1, 2, 3)]
    assert stage_spans(result["models"][VIT]["layers"]) == []
    assert stage_spans([{"stage": 1}, {"stage": 1}, {"stage": 2}, {"stage": 3}]) == [(1, 0, 1), (2, 2, 2), (3, 3, 3)]


def test_plain_labels_for_matplotlib():
    from mimlab.report.figures import plain

    assert plain("cost $5 or $6") == r"cost \$5 or \$6"  # never mathtext
    assert plain("x" * 50, 10) == "x" * 9 + "\u2026"


def test_model_without_a_metric_gets_no_panel(result):
    from mimlab.report.figures import layer_mean_figure, per_head_figure

    for layer in result["models"][SWIN]["layers"]:
        del layer["head_js"], layer["layer_mean"]["head_js"]
    fig = per_head_figure(result, "head_js", "t")
    assert [ax.get_title() for ax in fig.axes if ax.get_label() != "<colorbar>"] == [VIT + "\n(random init)"]
    fig = layer_mean_figure(result, "head_js", "t")
    assert len(fig.axes[0].lines) == 1


def test_cka_pairs_one_per_unordered_pair(result):
    from mimlab.report.figures import cka_pairs

    assert cka_pairs(result) == ([(VIT, VIT), (SWIN, SWIN)], [(VIT, SWIN)])
    del result["cka"][f"{VIT}/{SWIN}"]  # only B/A stored: still one panel, transposed
    assert cka_pairs(result)[1] == [(VIT, SWIN)]


def test_figures_are_valid_pngs(rendered):
    from PIL import Image

    _, out, paths, pyplot_before = rendered
    figs = paths["figures"]
    assert set(figs) == {"attention_distance", "head_kl", "head_js", "entropy", "nmi", "cka_within", "cka_across"}
    for name, p in figs.items():
        assert p == out / "figures" / f"{name}.png"
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(p) as im:
            im.load()
            w, h = im.size
            assert 500 <= w <= 2400 and 300 <= h <= 1600, (name, im.size)
            colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
            assert colours is not None and len(colours) > 50, name  # not blank
    if not pyplot_before:
        assert "matplotlib.pyplot" not in sys.modules  # no global pyplot state touched


def test_cka_heatmap_not_clamped_and_under_colour(result):
    from matplotlib.colors import to_rgba

    from mimlab.report.figures import CKA_OVER, CKA_UNDER, cka_figure

    fig = cka_figure(result, [(VIT, SWIN)], "t")
    im = fig.axes[0].images[0]
    data = im.get_array()
    assert data[3][0] == NEG_CKA and data.min() == NEG_CKA  # rows = VIT layers, columns = SWIN layers
    assert abs(im.norm.vmin) < 1e-5 and abs(im.norm.vmax - 1.0) < 1e-5
    assert im.cmap(im.norm(NEG_CKA)) == to_rgba(CKA_UNDER)
    assert im.cmap(im.norm(1.02)) == to_rgba(CKA_OVER)
    # float64 rounding around the exact bounds is not flagged as out of range
    assert im.cmap(im.norm(1.0 + 1e-12)) == im.cmap(im.norm(1.0)) != to_rgba(CKA_OVER)
    assert im.cmap(im.norm(-1e-12)) == im.cmap(im.norm(0.0)) != to_rgba(CKA_UNDER)


def test_per_head_figure_plots_every_head(result):
    from mimlab.report.figures import per_head_figure

    fig = per_head_figure(result, "attention_distance_px", "t")
    ax_vit, ax_swin = fig.axes[:2]
    dots = ax_swin.collections[0]
    offsets = dots.get_offsets()
    assert len(offsets) == 2 + 2 + 4 + 4
    # heads spread over 0.5 around their layer, head 0 leftmost, coloured by head index
    assert (offsets[-1][0], offsets[-1][1]) == (3.25, _head_value("attention_distance_px", 1, 3, 3))
    assert offsets[0][0] == -0.25 and offsets[-4][0] == 2.75
    assert dots.get_array().tolist() == [0, 1, 0, 1, 0, 1, 2, 3, 0, 1, 2, 3]
    uniform = [ln for ln in ax_vit.lines if ln.get_linestyle() == "--"]
    assert len(uniform) == 1 and uniform[0].get_ydata()[0] == 29.43
    assert ax_vit.get_shared_y_axes().joined(ax_vit, ax_swin)
    assert sorted(t.get_text() for t in ax_swin.texts) == ["stage 0", "stage 1"]
    assert [ln.get_xdata()[0] for ln in ax_swin.lines if ln.get_linestyle() == ":"] == [1.5]
    assert ax_vit.get_ylim()[0] == 0.0   # a non-negative statistic's axis starts at 0


def test_distance_figure_is_normalised_with_uniform_at_one_and_a_span_floor(result):
    from mimlab.report.figures import per_head_figure, zero_based_limits

    for lab in result["models"]:        # a flat, untrained-looking profile: every head at 1.001 x uniform
        for layer in result["models"][lab]["layers"]:
            layer["attention_distance_norm"] = [1.001] * layer["num_heads"]
            layer["layer_mean"]["attention_distance_norm"] = 1.001
            layer.get("ci", {}).pop("attention_distance_norm", None)
            layer.get("layer_ci", {}).pop("attention_distance_norm", None)
    fig = per_head_figure(result, "attention_distance_norm", "t")
    ax = fig.axes[0]
    assert [ln.get_ydata()[0] for ln in ax.lines if ln.get_linestyle() == "--"] == [1.0]
    lo, hi = ax.get_ylim()
    assert lo == 0.0 and hi >= 1.1          # 0.001 of spread is drawn as 0.001 of a 1.1-high axis, not stretched
    assert ax.get_title().endswith("uniform = 29.4 px")
    assert zero_based_limits(0.2, 0.5, min_top=1.1) == (0.0, 1.1 * 1.06)
    assert zero_based_limits(-0.5, 1.0)[0] < -0.5   # negative data (unbiased estimates) stay visible


def test_entropy_figure_marks_ln_k_and_uses_no_offset_notation(result):
    import math

    from mimlab.report.figures import layer_mean_figure

    for lab in result["models"]:
        for layer in result["models"][lab]["layers"]:
            layer["num_patch_keys"] = 64
            layer["entropy"] = [4.158 + 1e-4 * h for h in range(layer["num_heads"])]
            layer["layer_mean"]["entropy"] = 4.158
            layer.get("layer_ci", {}).pop("entropy", None)
    fig = layer_mean_figure(result, "entropy", "t")
    ax = fig.axes[0]
    fig.canvas.draw()
    refs = [ln for ln in ax.lines if ln.get_linestyle() == "--"]
    assert len(refs) == 1 and refs[0].get_ydata()[0] == math.log(64)       # one line: both models share K
    assert ax.get_ylim()[0] == 0.0 and ax.get_ylim()[1] > math.log(64)
    assert ax.yaxis.get_offset_text().get_text() == ""                      # no "+4.158" above the axis


def test_loss_curve_from_metrics_csv(tmp_path):
    from mimlab.report.figures import loss_figure, read_loss_curve, running_mean

    log = tmp_path / "metrics.csv"
    log.write_text("step,loss,lr\n1,2.0,0.1\n2,1.0,0.1\n3,nan,0.1\n4,0.5,0.1\n")
    curve = read_loss_curve(log, trivial=3.0)
    assert curve.steps == [1, 2, 4] and curve.losses == [2.0, 1.0, 0.5]
    assert running_mean([2.0, 1.0, 0.5], 2) == [2.0, 1.5, 0.75]
    fig = loss_figure({"simmim": curve})
    ax = fig.axes[0]
    assert [ln.get_ydata()[0] for ln in ax.lines if ln.get_linestyle() == "--"] == [3.0]
    assert ax.get_ylim()[0] == 0.0
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(MimlabError, match="bad.csv: not a training log"):
        read_loss_curve(tmp_path / "bad.csv")


@pytest.mark.slow
def test_figure_formats_and_dpi(result, tmp_path):
    from PIL import Image

    from mimlab.errors import ConfigError
    from mimlab.report.figures import make_figures
    from mimlab.report.options import FigureOptions

    assert FigureOptions(("svg",)).formats == ("png", "svg")
    with pytest.raises(ConfigError, match="'eps' is not one of png, pdf, svg"):
        FigureOptions(("eps",))
    with pytest.raises(ConfigError, match="figure_dpi"):
        FigureOptions(dpi=0)
    a = make_figures(result, tmp_path / "a", FigureOptions(("pdf", "svg"), dpi=100))
    b = make_figures(result, tmp_path / "b", FigureOptions(dpi=200))
    for name, png in a.items():
        assert png.suffix == ".png" and png.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"
        assert b"<svg" in png.with_suffix(".svg").read_bytes()[:500]
        wa, wb = Image.open(png).width, Image.open(b[name]).width
        assert 1.9 < wb / wa < 2.1, name        # pixels scale with the dpi
    again = make_figures(result, tmp_path / "c", FigureOptions(("pdf", "svg"), dpi=100))
    for name, png in again.items():            # no dates in the files: the same data give the same bytes
        for ext in (".png", ".pdf", ".svg"):
            assert png.with_suffix(ext).read_bytes() == a[name].with_suffix(ext).read_bytes(), (name, ext)


# ---------------------------------------------------------------------------------------------------------------
# HTML report
# ---------------------------------------------------------------------------------------------------------------
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class _Checker(HTMLParser):
    """Tag balance (non-void elements must close in order) and every src/href collected."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.urls: list[str] = []
        self.doctype = None

    def handle_decl(self, decl):
        self.doctype = decl

    def handle_starttag(self, tag, attrs):
        self.urls += [v for k, v in attrs if k in ("src", "href") and v is not None]
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open {self.stack[-3:]}")
        else:
            self.stack.pop()


def test_report_contents(rendered):
    res, out, paths, _ = rendered
    report = paths["report"]
    assert report == out / "report.html"
    text = report.read_text(encoding="utf-8")
    chk = _Checker()
    chk.feed(text)
    chk.close()
    assert chk.doctype == "DOCTYPE html" and not chk.errors and not chk.stack
    # self-contained: every src/href is a data URI, nothing fetched from the network
    assert chk.urls and all(u.startswith("data:image/png;base64,") for u in chk.urls)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert "http://" not in text and "https://" not in text and "<script" not in text.lower()
    # every figure embedded byte for byte
    embedded = [base64.b64decode(u.split(",", 1)[1]) for u in chk.urls]
    assert embedded == [p.read_bytes() for p in paths["figures"].values()]
    # the hostile label only appears escaped
    assert "vit&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; co" in text
    # exactly one random-init warning, naming the ViT
    warnings = re.findall(r'<div class="warning".*?</div>', text, re.S)
    assert len(warnings) == 1 and "random initialisation: these numbers describe an untrained network" in warnings[0]
    assert "vit&lt;script" in warnings[0]
    # model table: sha256 shortened with the full hash in the title, checkpoint, sizes, uniform distance
    assert f'<code title="{"ab" * 32}">{"ab" * 6}&hellip;</code>' in text
    assert "/ckpt/swin.safetensors" in text and "8 \u00d7 8" in text and ">29.43<" in text
    assert "4 blocks in 2 stages" in text and "2 \u2013 4" in text
    # provenance, CKA config, captions with definitions
    assert "mimlab probe --seed 7 &#x27;a b&#x27;" in text and "unbiased_minibatch" in text
    assert "sum_j A[i,j] * ||g_i - g_j||" in text and "KL(A_h[i] || A_h&#x27;[i])" in text
    assert "1.0 (dashed) is uniform attention" in text and "maximum ln K" in text


def test_summary_table_first_middle_last(result):
    from mimlab.report.html import fmt, summary_positions, summary_table

    assert summary_positions(4) == [("first", 0), ("middle", 2), ("last", 3)]
    assert summary_positions(1) == [("first", 0), ("middle", 0), ("last", 0)]
    html_text = summary_table(result)
    lms = [result["models"][SWIN]["layers"][i]["layer_mean"]["head_kl"] for i in (0, 2, 3)]
    row = "<tr><td><code>head_kl</code></td>" + "".join(f'<td class="num">{fmt(v)}</td>' for v in lms) + "</tr>"
    assert row in html_text  # Swin has no CI: bare values
    vit = result["models"][VIT]["layers"][0]
    assert f'{fmt(vit["layer_mean"]["entropy"])} <span class="ci">[{fmt(vit["layer_ci"]["entropy"][0])}, ' \
           f'{fmt(vit["layer_ci"]["entropy"][1])}]</span>' in html_text
    assert "first = layers.0.blocks.0, middle = layers.1.blocks.0, last = layers.1.blocks.1" in html_text


def test_write_report_without_figures(result, tmp_path):
    from mimlab.report.html import write_report

    text = write_report(result, tmp_path, figures={}, title="A <b>title</b>").read_text(encoding="utf-8")
    assert "<title>A &lt;b&gt;title&lt;/b&gt;</title>" in text and "No figures." in text
    assert "data:image/png" not in text and not (tmp_path / "figures").exists()
    result["models"][VIT]["random_init"] = False
    text = write_report(result, tmp_path, figures={}).read_text(encoding="utf-8")
    assert 'class="warning"' not in text


def test_write_report_rejects_non_png(result, tmp_path):
    from mimlab.report.html import write_report

    bad = tmp_path / "x.png"
    bad.write_bytes(b"GIF89a")
    with pytest.raises(MimlabError, match="not a PNG"):
        write_report(result, tmp_path, figures={"x": bad})
    assert not (tmp_path / "report.html").exists()


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium (/usr/bin/chromium) not installed: no headless "
                                             "screenshot of the report")
def test_report_screenshot_headless(rendered, tmp_path):
    from PIL import Image

    _, out, paths, _ = rendered
    shot = tmp_path / "report.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--hide-scrollbars", "--no-first-run", "--window-size=1280,2400", f"--screenshot={shot}",
           paths["report"].resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90, cwd=tmp_path)
    assert shot.exists(), f"chromium made no screenshot (rc {proc.returncode}): {proc.stderr[-2000:]}"
    with Image.open(shot) as im:
        im.load()
        assert im.size == (1280, 2400)
        rgb = im.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 22)
        assert colours is not None and len(colours) > 200  # text, tables and images rendered, not a blank page
        # the warning box's background colour (#fde7e9) is on screen
        assert any(c == (0xFD, 0xE7, 0xE9) for _, c in colours)
    keep = out / "report_screenshot.png"
    keep.write_bytes(shot.read_bytes())  # for a human to look at


def test_claim_numbers_are_rounded_to_their_interval_and_tasks_are_a_subtable():
    from mimlab.report.study import _fmt_values, interval_decimals, mask_text, round_to, with_interval

    assert [interval_decimals(*ci) for ci in ((0.177, 0.183), (0.0, 3.4), (-20, 26), (1.0, 1.0))] == [4, 1, 0, 4]
    assert with_interval(0.18034, (0.17712, 0.18311)) == "0.1803 [0.1771, 0.1831]"
    assert with_interval(2.0, None) == "2" and round_to(-0.00001, 3) == "0.000"
    c1 = _fmt_values({"supervised": 1.0000579, "simmim": 1.0000117, "delta": 4.6e-05, "ci": [-3.07e-05, 1.9e-4]})
    assert c1 == ("<b>supervised</b>: 1.00006<br><b>simmim</b>: 1.00001<br>"      # half-width 1.1e-4: 5 decimals
                  "<b>delta</b>: 0.00005 [-0.00003, 0.00019]")
    c4 = _fmt_values({"depth": {"metric": "rmse", "higher_is_better": False, "simmim": [2.5, 2.7],
                                "supervised": [2.6, 2.8], "mean_simmim": 2.6, "mean_supervised": 2.7,
                                "better_by": 0.1, "ci": [-0.31, 0.51], "detectable": 0.6123, "verdict": "inconclusive"}})
    assert c4.startswith('<table class="tasks">') and "<td>depth</td>" in c4 and "0.10 [-0.31, 0.51]" in c4
    assert "detectable (80% power)" in c4 and "<td>0.61</td>" in c4
    assert "(n=2)" in c4 and "[2.5" not in c4 and "higher_is_better" not in c4        # no Python literals
    assert mask_text({"mask_patch_size": 8, "mask_cells": [4, 4], "masked_cells": 10, "mask_ratio": 0.6,
                      "masked_fraction": 0.625, "patch_size": 8}) == \
        "8 px cells on a 4x4 grid, 10 masked (ratio 0.6, 62.5% of the image), encoder patch 8 px"


def test_paired_differences_figure_from_a_study_summary(tmp_path):
    """The C4-C6 task comparisons with per-seed differences become one panel each (titles carry the verdict)."""
    from mimlab.report.figures import paired_differences_figure, save_figure
    from mimlab.reproduce.claims import Thresholds, claim_c4, claim_c5
    from mimlab.report.study import paired_comparisons

    vals = {"mim": {"keypoints": {0: 0.5, 1: 0.52, 2: 0.51}, "depth": {0: 0.3, 1: 0.31}, "track": {0: 0.6},
                    "classify": {0: 0.8, 1: 0.801, 2: 0.8}},
            "sup": {"keypoints": {0: 0.41, 1: 0.41, 2: 0.43}, "depth": {0: 0.4, 1: 0.39}, "track": {0: 0.5},
                    "classify": {0: 0.8, 1: 0.8, 2: 0.8}}}
    claims = {"C4": claim_c4(vals, "mim", "sup", Thresholds()).to_dict(),
              "C5": claim_c5(vals, "mim", "sup", Thresholds()).to_dict(),
              "C3": {"values": {"mim": 0.9, "sup": 0.5, "delta": 0.4}}}
    comps = paired_comparisons(claims)
    assert [c.name for c in comps] == ["C4 keypoints", "C4 depth", "C4 track", "C5 classify"]
    kp = comps[0]
    assert kp.seeds == [0, 1, 2] and kp.differences == pytest.approx([0.09, 0.11, 0.08]) and kp.verdict == "holds"
    assert comps[1].differences == pytest.approx([0.1, 0.08])   # depth: lower RMSE is better; 2 seeds, t(1) = 12.7
    assert comps[2].ci is None and comps[3].threshold == -0.01
    from mimlab.report.study import VERDICT_COLOUR
    assert comps[0].color == VERDICT_COLOUR["holds"] and comps[2].color == VERDICT_COLOUR["inconclusive"]
    fig = paired_differences_figure(comps)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert titles == ["C4 keypoints: holds", "C4 depth: inconclusive", "C4 track: inconclusive", "C5 classify: holds"]
    png = save_figure(fig, tmp_path / "paired")
    assert png.is_file() and png.stat().st_size > 5_000


def test_gated_models_from_the_field_or_an_older_summarys_reason():
    from mimlab.report.study import gated_models

    gates = {"simmim": {"ok": False}, "supervised": {"ok": False}, "mae": {"ok": True}}
    assert gated_models({"gated_by": ["supervised"], "reason": "not trained enough to compare — simmim: x"},
                        gates) == ["supervised"]                                   # the field wins
    assert gated_models({"reason": "not trained enough to compare — simmim: loss 0.95x"}, gates) == ["simmim"]
    assert gated_models({"reason": ""}, gates) == []
