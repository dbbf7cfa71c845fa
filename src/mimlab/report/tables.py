"""Tidy tables from a probe result (the dict stored in ``metrics.json``), and the checks that read it.

A tidy table has one observation per row: ``heads.csv`` one (model, layer, head, metric) value,
``layers.csv`` one (model, layer, metric) layer mean, ``cka.csv`` one (model pair, layer pair) CKA value.
Everything here is plain Python (stdlib ``csv``); Parquet copies are written only when ``pyarrow`` is importable.

Conventions: ``layer_index`` is the 0-based position of the block in depth order (the order of
``models[label]["layers"]``); in ``cka.csv`` ``layer_a``/``layer_b`` are such 0-based indices into
model_a's and model_b's layers. Missing values (no bootstrap CI, no stage) are empty cells.
"""
from __future__ import annotations

import csv
import math
import os
from numbers import Real
from pathlib import Path
from typing import Any, Iterator

from mimlab.errors import MimlabError
from mimlab.utils.io import atomic_path

# Per-head metrics in the order tables and reports show them; other per-head lists are appended after these.
HEAD_METRICS: tuple[str, ...] = (
    "attention_distance_px",
    "attention_distance_norm",
    "head_kl",
    "head_js",
    "entropy",
    "prefix_mass",
    "nmi",
)
# Keys of a layer entry that are not per-head metric lists.
_LAYER_KEYS = {"name", "stage", "num_heads", "ci", "layer_mean", "layer_ci"}

HEAD_COLUMNS = ("model", "layer_index", "layer", "stage", "head", "metric", "value", "ci_low", "ci_high")
LAYER_COLUMNS = ("model", "layer_index", "layer", "stage", "metric", "mean", "ci_low", "ci_high")
CKA_COLUMNS = ("model_a", "model_b", "layer_a", "layer_b", "cka")

Row = dict[str, Any]


# ---------------------------------------------------------------------------------------------------------------
# Reading and checking the result dict
# ---------------------------------------------------------------------------------------------------------------
def _is_number(x: Any) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def _number(x: Any, where: str) -> float:
    if x is None:
        return math.nan
    if not _is_number(x):
        raise MimlabError(f"{where}: expected a number, got {type(x).__name__} {x!r:.60}")
    return float(x)


def models(result: dict) -> dict[str, dict]:
    """The ``models`` mapping of a result, checked to be a non-empty dict of dicts."""
    if not isinstance(result, dict):
        raise MimlabError(f"probe result: expected a JSON object (dict), got {type(result).__name__}")
    ms = result.get("models")
    if not isinstance(ms, dict) or not ms:
        raise MimlabError("probe result: key 'models' is missing or empty (expected {label: {...}})")
    for label, m in ms.items():
        if not isinstance(m, dict):
            raise MimlabError(f"probe result: models[{label!r}] must be an object, got {type(m).__name__}")
    return ms


def layers(result: dict, label: str) -> list[dict]:
    """The checked ``layers`` list of one model (non-empty; every entry has a name and a positive num_heads)."""
    ls = models(result)[label].get("layers")
    where = f"probe result: models[{label!r}].layers"
    if not isinstance(ls, list) or not ls:
        raise MimlabError(f"{where} is missing or empty (expected one entry per block)")
    for i, layer in enumerate(ls):
        if not isinstance(layer, dict):
            raise MimlabError(f"{where}[{i}] must be an object, got {type(layer).__name__}")
        h = layer.get("num_heads")
        if not isinstance(h, int) or isinstance(h, bool) or h < 1:
            raise MimlabError(f"{where}[{i}].num_heads must be a positive integer, got {h!r}")
        stage = layer.get("stage")
        if stage is not None and (not isinstance(stage, int) or isinstance(stage, bool)):
            raise MimlabError(f"{where}[{i}].stage must be an integer or null, got {stage!r}")
    return ls


def layer_name(layer: dict, index: int) -> str:
    return str(layer.get("name", f"layer {index}"))


def head_metric_names(layer: dict) -> list[str]:
    """Per-head metrics present in a layer entry: the known ones in canonical order, then any other lists, sorted."""
    known = [m for m in HEAD_METRICS if m in layer]
    extra = sorted(k for k, v in layer.items() if k not in _LAYER_KEYS and k not in HEAD_METRICS and isinstance(v, list))
    return known + extra


def head_values(result: dict, label: str, index: int, metric: str) -> list[float]:
    """One layer's per-head values of ``metric`` as floats (None -> NaN); length must equal ``num_heads``."""
    layer = layers(result, label)[index]
    where = f"probe result: models[{label!r}].layers[{index}].{metric}"
    vals = layer.get(metric)
    if not isinstance(vals, list):
        raise MimlabError(f"{where} is missing or not a list")
    if len(vals) != layer["num_heads"]:
        raise MimlabError(f"{where} has {len(vals)} values but num_heads is {layer['num_heads']}")
    return [_number(v, f"{where}[{h}]") for h, v in enumerate(vals)]


def head_ci(result: dict, label: str, index: int, metric: str) -> tuple[list[float], list[float]] | None:
    """Per-head 95% CI bounds (low, high) of ``metric``, or None when the result has no CI for it."""
    layer = layers(result, label)[index]
    ci = (layer.get("ci") or {}).get(metric)
    if ci is None:
        return None
    where = f"probe result: models[{label!r}].layers[{index}].ci.{metric}"
    if not isinstance(ci, dict) or not isinstance(ci.get("low"), list) or not isinstance(ci.get("high"), list):
        raise MimlabError(f"{where} must be {{'low': [per head], 'high': [per head]}}")
    out = []
    for key in ("low", "high"):
        if len(ci[key]) != layer["num_heads"]:
            raise MimlabError(f"{where}.{key} has {len(ci[key])} values but num_heads is {layer['num_heads']}")
        out.append([_number(v, f"{where}.{key}[{h}]") for h, v in enumerate(ci[key])])
    return out[0], out[1]


def layer_mean_names(layer: dict) -> list[str]:
    """Metrics with a layer mean: known ones in canonical order, then others sorted."""
    lm = layer.get("layer_mean") or {}
    return [m for m in HEAD_METRICS if m in lm] + sorted(m for m in lm if m not in HEAD_METRICS)


def layer_mean(result: dict, label: str, index: int, metric: str) -> float:
    """The stored layer mean of ``metric`` (NaN when the result has none for this layer)."""
    layer = layers(result, label)[index]
    lm = layer.get("layer_mean") or {}
    if not isinstance(lm, dict):
        raise MimlabError(f"probe result: models[{label!r}].layers[{index}].layer_mean must be an object")
    return _number(lm.get(metric), f"probe result: models[{label!r}].layers[{index}].layer_mean.{metric}")


def layer_ci(result: dict, label: str, index: int, metric: str) -> tuple[float, float] | None:
    """The stored 95% CI [low, high] of a layer mean, or None when absent."""
    layer = layers(result, label)[index]
    ci = (layer.get("layer_ci") or {}).get(metric)
    if ci is None:
        return None
    where = f"probe result: models[{label!r}].layers[{index}].layer_ci.{metric}"
    if not isinstance(ci, (list, tuple)) or len(ci) != 2:
        raise MimlabError(f"{where} must be [low, high]")
    return _number(ci[0], where + "[0]"), _number(ci[1], where + "[1]")


def split_pair(key: str, labels: list[str]) -> tuple[str, str]:
    """Split a CKA key ``"A/B"`` into (A, B) using the known model labels (labels may themselves contain '/')."""
    cands = [(key[:i], key[i + 1:]) for i, c in enumerate(key) if c == "/"]
    known = [(a, b) for a, b in cands if a in labels and b in labels]
    if len(known) == 1:
        return known[0]
    if len(known) > 1:
        raise MimlabError(f"probe result: cka key {key!r} splits into model labels in more than one way")
    raise MimlabError(f"probe result: cka key {key!r} is not 'A/B' with A and B among the models {labels}")


def cka_matrices(result: dict) -> dict[tuple[str, str], list[list[float]]]:
    """All CKA matrices keyed by (model_a, model_b), checked to be L_A x L_B (rows = model_a's layers)."""
    cka = result.get("cka")
    if cka is None:
        return {}
    if not isinstance(cka, dict):
        raise MimlabError("probe result: 'cka' must be an object {'A/B': [[...]]}")
    labels = list(models(result))
    out: dict[tuple[str, str], list[list[float]]] = {}
    for key, mat in cka.items():
        a, b = split_pair(key, labels)
        la, lb = len(layers(result, a)), len(layers(result, b))
        where = f"probe result: cka[{key!r}]"
        if not isinstance(mat, list) or len(mat) != la or any(not isinstance(r, list) or len(r) != lb for r in mat):
            raise MimlabError(f"{where} must be a {la} x {lb} list of lists (layers of {a!r} x layers of {b!r})")
        out[(a, b)] = [[_number(v, f"{where}[{i}][{j}]") for j, v in enumerate(r)] for i, r in enumerate(mat)]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------------------
def _iter_layers(result: dict) -> Iterator[tuple[str, int, dict]]:
    for label in models(result):
        for i, layer in enumerate(layers(result, label)):
            yield label, i, layer


def head_rows(result: dict) -> list[Row]:
    """One row per (model, layer, head, metric), columns ``HEAD_COLUMNS``; CI bounds None when absent."""
    rows: list[Row] = []
    for label, i, layer in _iter_layers(result):
        for metric in head_metric_names(layer):
            vals = head_values(result, label, i, metric)
            ci = head_ci(result, label, i, metric)
            for h, v in enumerate(vals):
                rows.append({
                    "model": label, "layer_index": i, "layer": layer_name(layer, i), "stage": layer.get("stage"),
                    "head": h, "metric": metric, "value": v,
                    "ci_low": ci[0][h] if ci else None, "ci_high": ci[1][h] if ci else None,
                })
    return rows


def layer_rows(result: dict) -> list[Row]:
    """One row per (model, layer, metric) with the stored layer mean, columns ``LAYER_COLUMNS``."""
    rows: list[Row] = []
    for label, i, layer in _iter_layers(result):
        for metric in layer_mean_names(layer):
            ci = layer_ci(result, label, i, metric)
            rows.append({
                "model": label, "layer_index": i, "layer": layer_name(layer, i), "stage": layer.get("stage"),
                "metric": metric, "mean": layer_mean(result, label, i, metric),
                "ci_low": ci[0] if ci else None, "ci_high": ci[1] if ci else None,
            })
    return rows


def cka_rows(result: dict) -> list[Row]:
    """One row per (model_a, model_b, layer_a, layer_b), columns ``CKA_COLUMNS``, in the order of ``result['cka']``."""
    rows: list[Row] = []
    for (a, b), mat in cka_matrices(result).items():
        for i, r in enumerate(mat):
            for j, v in enumerate(r):
                rows.append({"model_a": a, "model_b": b, "layer_a": i, "layer_b": j, "cka": v})
    return rows


def check_result(result: dict) -> None:
    """Check the whole result (every per-head list, CI, layer mean and CKA matrix); raise MimlabError naming the key."""
    head_rows(result)
    layer_rows(result)
    cka_matrices(result)


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------
def _cell(v: Any) -> Any:
    """CSV cell: None -> empty; floats keep repr precision (Python's str(float) round-trips exactly)."""
    return "" if v is None else v


def write_csv(path: str | os.PathLike, rows: list[Row], columns: tuple[str, ...]) -> Path:
    """Write ``rows`` (dicts) as a CSV with a header line, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(columns)
            for r in rows:
                w.writerow([_cell(r[c]) for c in columns])
    return path


def _write_parquet(path: Path, rows: list[Row], columns: tuple[str, ...]) -> Path | None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return None
    table = pa.table({c: [r[c] for r in rows] for c in columns})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def write_tables(result: dict, out_dir: str | os.PathLike) -> list[Path]:
    """Write ``heads.csv``, ``layers.csv`` and ``cka.csv`` (plus ``.parquet`` copies if pyarrow is importable).

    Returns the written paths. All rows are built (and the result checked) before anything is written.
    """
    out = Path(out_dir)
    tables = {
        "heads": (head_rows(result), HEAD_COLUMNS),
        "layers": (layer_rows(result), LAYER_COLUMNS),
        "cka": (cka_rows(result), CKA_COLUMNS),
    }
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (rows, columns) in tables.items():
        paths.append(write_csv(out / f"{name}.csv", rows, columns))
        pq_path = _write_parquet(out / f"{name}.parquet", rows, columns)
        if pq_path is not None:
            paths.append(pq_path)
    return paths
