"""The study's summary (`summary.json`): the claims' verdicts from the stage outputs, with the gates and the
downstream table. The page that shows it is `mimlab.report.study`."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from mimlab.probe.attention_stats import METRICS
from mimlab.reproduce.claims import (TASK_METRIC, Thresholds, evaluate_claims, gate_model,
                                     mean_offdiag, t975)
from mimlab.reproduce.presets import StudyConfig
from mimlab.utils.io import load_json


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
    from mimlab.data.spec import parse_data_spec
    from mimlab.pretrain.baselines import trivial_loss

    spec = parse_data_spec(cfg.pretrain_data)
    num_classes = spec.params.get("classes")
    for m in cfg.methods:
        loss = pre.get(m, {}).get("final_loss")
        trivial = trivial_loss(m, num_classes=num_classes, mean_colour_l1=baseline.get("mean_colour_l1"))
        ratio = loss / trivial if loss is not None and trivial else None
        attn_change = float(np.max(np.abs(dist[m] - dist["random"])))
        cross = metrics["cka"].get(f"{m}/random")
        cka_init = float(np.mean(np.diag(np.asarray(cross)))) if cross is not None else None
        gates[m] = gate_model(m, loss_ratio=ratio, loss_ratio_max=cfg.gate_loss_ratio, attn_change=attn_change,
                              attn_change_min=cfg.gate_attention_change, cka_to_init=cka_init,
                              cka_to_init_max=cfg.gate_cka_to_init)
        gates[m]["trivial_loss"] = trivial     # what the loss ratio divides by (the report's loss figure draws it)

    # downstream: main metric per model/task over seeds ({seed: value}: the claims pair models by seed)
    values: dict[str, dict[str, dict[int, float]]] = {}
    table: list[dict[str, Any]] = []
    for label, tasks in downstream.items():
        for task, runs in tasks.items():
            metric, higher = TASK_METRIC[task]
            vals = [r["metrics"][metric] for r in runs]
            values.setdefault(label, {})[task] = {r.get("seed", i): v for i, (r, v) in enumerate(zip(runs, vals))}
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
