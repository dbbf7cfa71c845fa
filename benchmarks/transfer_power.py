"""Statistical power of the study's transfer comparisons (claims C4-C6) per CPU second.

Reads the transfer runs of a finished study (`mimlab reproduce ... --out STUDY`) and, optionally, runs more of them
at other step counts with the study's own checkpoints and data (resumable: a run whose metrics.json exists is
kept). For every comparison (task x steps) it prints the spread over seeds of each model and of the per-seed paired
difference, the 95% half-widths of Welch's and of the paired interval, the effect the paired design detects with
80% power, the observed effect, the seeds it would take to decide that effect, and the seconds of one run.

    python benchmarks/transfer_power.py --study runs/cpu5
    python benchmarks/transfer_power.py --study runs/cpu5 --steps 60,240 --tasks classify,track --seeds 0-4 \\
        --out runs/power
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from mimlab.reproduce.claims import TASK_METRIC, Thresholds, t80, t975, task_compare

COMPARISONS = {   # claim -> (model a, model b, margin, relative)
    "C4": ("simmim", "supervised", 0.0, False),
    "C5": ("simmim", "supervised", Thresholds().noninferiority, False),
    "C6": ("supervised-drop{k}", "supervised", Thresholds().relative_margin, True),
}
CLAIM_TASKS = {"C4": ("keypoints", "depth", "track"), "C5": ("classify",), "C6": ("keypoints", "depth")}


def seeds_needed(sd: float, gap: float, max_n: int = 200) -> int | None:
    """Smallest n with (t_0.975(n-1) + t_0.80(n-1)) sd / sqrt(n) <= gap: the seeds that decide an effect `gap`
    away from the rule's threshold with 80% power; None if more than max_n."""
    if gap <= 0:
        return None
    if sd == 0:
        return 2
    for n in range(2, max_n + 1):
        if (t975(n - 1) + t80(n - 1)) * sd / math.sqrt(n) <= gap:
            return n
    return None


def collect(root: Path, steps_of: dict[str, int] | None = None) -> dict[tuple[str, str, int], dict[int, dict]]:
    """(label, task, steps) -> {seed: metrics.json} for every `<label>/<task>/s<seed>/metrics.json` under root."""
    runs: dict[tuple[str, str, int], dict[int, dict]] = {}
    for f in sorted(root.glob("*/*/s*/metrics.json")):
        rep = json.loads(f.read_text())
        label, task, seed = f.parent.parent.parent.name, f.parent.parent.name, int(f.parent.name[1:])
        steps = int(rep["config"]["steps"])
        stage = f.parent / "stage.json"
        rep["_seconds"] = (json.loads(stage.read_text())["seconds"] if stage.is_file()
                           else rep["train"]["train_s"] + rep["train"]["eval_s"])
        runs.setdefault((label, task, steps), {})[seed] = rep
    return runs


def run_grid(study_dir: Path, out: Path, tasks: list[str], steps_list: list[int], seeds: list[int],
             labels: list[str], data: dict[str, str] | None = None) -> None:
    """The study's own transfer runs (its checkpoints, data and every other setting) at other step counts; `data`
    replaces a task's dataset (e.g. a larger evaluation split)."""
    import dataclasses

    from mimlab.reproduce.pipeline import Study
    from mimlab.reproduce.presets import build_config
    from mimlab.transfer.api import run_transfer

    config = json.loads((study_dir / "summary.json").read_text())["config"]
    study = Study(build_config(config.pop("preset"), config), study_dir, progress=False)
    for steps in steps_list:
        for task in tasks:
            for seed in seeds:
                for label in labels:
                    base, _, drop = label.partition("-drop")
                    d = out / f"steps{steps}" / label / task / f"s{seed}"
                    if (d / "metrics.json").is_file():
                        continue
                    path = (data or {}).get(task) or study.data_path(task)
                    tcfg = study.transfer_config(base, study.model_path(base), task, seed, path, int(drop or 0), d)
                    run_transfer(dataclasses.replace(tcfg, steps=steps, overwrite=True, progress=False))
                    print(f"ran {d}", flush=True)


def analyse(runs: dict[tuple[str, str, int], dict[int, dict]], drop_k: int) -> list[dict]:
    """Each comparison of the claims at each step count, by the claims' own rule (`claims.task_compare`), with the
    spreads and costs behind it."""
    rows = []
    th = Thresholds()
    steps_all = sorted({s for (_, _, s) in runs})
    for claim, (a, b, margin, relative) in COMPARISONS.items():
        a = a.format(k=drop_k)
        for task in CLAIM_TASKS[claim]:
            metric = TASK_METRIC[task][0]
            for steps in steps_all:
                ra, rb = runs.get((a, task, steps), {}), runs.get((b, task, steps), {})
                seeds = sorted(set(ra) & set(rb))
                if len(seeds) < 2:
                    continue
                values = {m: {task: {s: r[s]["metrics"][metric] for s in seeds}} for m, r in ((a, ra), (b, rb))}
                c = task_compare(values, task, a, b, th, margin=margin, relative=relative)
                sd_d = statistics.stdev(c["differences"])
                secs = statistics.mean([ra[s]["_seconds"] for s in seeds] + [rb[s]["_seconds"] for s in seeds])
                rows.append({"claim": claim, "task": task, "metric": metric + ("/mean" if relative else ""),
                             "steps": steps, "n": len(seeds), "mean_a": c[f"mean_{a}"], "mean_b": c[f"mean_{b}"],
                             "sd_a": statistics.stdev(c[a]), "sd_b": statistics.stdev(c[b]), "sd_diff": sd_d,
                             "welch_half": (c["welch_ci"][1] - c["welch_ci"][0]) / 2,
                             "paired_half": (c["ci"][1] - c["ci"][0]) / 2, "effect": c["better_by"],
                             "ci": tuple(c["ci"]), "detectable": c["detectable"],
                             "seeds_needed": seeds_needed(sd_d, abs(c["better_by"] + margin)), "run_s": secs,
                             "verdict": c["verdict"]})
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| claim | task | metric | steps | seeds | mean a / b | sd a / b | sd of paired diff | Welch ± | "
            "paired ± | effect [95% CI] | detectable (80%) | seeds to decide | s per run | verdict |")
    out = [head, "|" + "---|" * 15]
    for r in rows:
        need = r["seeds_needed"]
        out.append(f"| {r['claim']} | {r['task']} | {r['metric']} | {r['steps']} | {r['n']} | "
                   f"{r['mean_a']:.4g} / {r['mean_b']:.4g} | {r['sd_a']:.3g} / {r['sd_b']:.3g} | {r['sd_diff']:.3g} | "
                   f"{r['welch_half']:.3g} | {r['paired_half']:.3g} | {r['effect']:.3g} "
                   f"[{r['ci'][0]:.3g}, {r['ci'][1]:.3g}] | {r['detectable']:.3g} | "
                   f"{'>200' if need is None else need} | {r['run_s']:.0f} | {r['verdict']} |")
    return "\n".join(out)


def _seeds(text: str) -> list[int]:
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--study", required=True, type=Path, help="a finished `mimlab reproduce` output folder")
    ap.add_argument("--out", type=Path, help="where the extra runs go (with --steps)")
    ap.add_argument("--steps", default="", help="extra step counts to run, e.g. 60,240")
    ap.add_argument("--tasks", default="classify,keypoints,depth,track")
    ap.add_argument("--seeds", default="0-4")
    ap.add_argument("--labels", default="simmim,supervised")
    ap.add_argument("--data", action="append", default=[], metavar="TASK=PATH",
                    help="run a task on another dataset (only the runs of --out use it)")
    args = ap.parse_args()
    summary = json.loads((args.study / "summary.json").read_text())
    drop_k = summary["config"]["ablation_blocks"]
    if args.steps:
        if args.out is None:
            ap.error("--steps needs --out")
        run_grid(args.study, args.out, args.tasks.split(","), [int(s) for s in args.steps.split(",")],
                 _seeds(args.seeds), args.labels.split(","), dict(d.split("=", 1) for d in args.data))
    runs = collect(args.study / "stages" / "transfer")
    if args.out is not None:
        for d in sorted(args.out.glob("steps*")):
            for k, v in collect(d).items():
                runs.setdefault(k, {}).update(v)
    print(markdown(analyse(runs, drop_k)))


if __name__ == "__main__":
    main()
