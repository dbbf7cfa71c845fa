"""`mimlab reproduce` end to end on a miniature config: report, summary schema, stage caching."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from mimlab.cli import main
from conftest import MINI_STUDY

MINI = MINI_STUDY


def _run(cfg: Path, out: Path, capsys, *extra: str) -> list[str]:
    assert main(["reproduce", "--config", str(cfg), "--out", str(out), "--quiet", *extra]) == 0
    err = capsys.readouterr().err
    return [line.split()[-1] if False else line for line in err.splitlines() if line.startswith("[")]


@pytest.mark.slow
def test_miniature_study_report_schema_and_caching(tmp_path, capsys):
    cfg = tmp_path / "mini.yaml"
    cfg.write_text(MINI)
    out = tmp_path / "study"
    first = _run(cfg, out, capsys)
    assert first and all(line.startswith("[run ]") for line in first)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["claims"]) == {"C1", "C2", "C3", "C4", "C5", "C6"}
    for c in summary["claims"].values():
        assert c["verdict"] in ("holds", "does_not_hold", "inconclusive")
        assert c["statistic"] and c["rule"]
    # a few steps of training cannot pass the 'trained enough' gate: every claim must say so
    assert all(c["verdict"] == "inconclusive" and "not trained enough" in c["reason"]
               for c in summary["claims"].values())
    assert summary["simmim_avg_dist_px"] > 0 and summary["simmim_mean_colour_l1"] > 0
    assert {"simmim", "supervised", "random"} <= set(summary["probe"]["layer_means"])
    html = (out / "report.html").read_text()
    assert "Claims" in html and "data:image/png;base64," in html and "not the paper" in html
    # each failed gate is said once, above the claims table; rows carry a short tag
    assert html.count("<li><b>simmim</b>:") == 1 and html.count("<li><b>supervised</b>:") == 1
    assert html.count("gated: simmim, supervised (see above)") == 5 and "gated: supervised (see above)" in html
    assert (out / "downstream.csv").is_file() and (out / "claims.csv").is_file()
    # the pretraining loss curves (from each stage's metrics.csv) lead the figures; img/s of a short run is shown
    assert (out / "figures" / "loss.png").is_file() and 'id="fig-loss"' in html
    assert (out / "figures" / "paired_differences.png").is_file() and 'id="fig-paired_differences"' in html
    assert all(summary["pretrain"][m]["img_per_s"] > 0 for m in ("simmim", "supervised"))

    # second run: every stage cached
    second = _run(cfg, out, capsys)
    assert second and all(line.startswith("[skip]") for line in second)

    # delete one stage's output: it and its dependants rerun, nothing else
    (out / "stages" / "pretrain" / "supervised" / "model.safetensors").unlink()
    third = _run(cfg, out, capsys)
    ran = sorted(line.split()[-1] for line in third if line.startswith("[run ]"))
    assert ran == sorted(["pretrain/supervised", "probe", "transfer/supervised/classify/s0",
                          "transfer/supervised/keypoints/s0", "transfer/supervised/depth/s0",
                          "transfer/supervised/track/s0", "transfer/supervised-drop1/keypoints/s0",
                          "transfer/supervised-drop1/depth/s0"])

    # --force reruns that stage and its dependants
    fourth = _run(cfg, out, capsys, "--force", "probe", "--figure-format", "svg")
    assert [line.split()[-1] for line in fourth if line.startswith("[run ]")] == ["probe"]
    assert (out / "figures" / "loss.svg").is_file() and (out / "figures" / "entropy.svg").is_file()
    before = json.loads((out / "summary.json").read_text())

    # a moved study folder keeps every finished stage, and a stage rerun there reads its inputs from the new place
    moved = tmp_path / "elsewhere" / "study"
    moved.parent.mkdir()
    shutil.move(str(out), str(moved))
    fifth = _run(cfg, moved, capsys)
    assert fifth and all(line.startswith("[skip]") for line in fifth), fifth
    after = json.loads((moved / "summary.json").read_text())
    assert after["claims"] == before["claims"] and after["downstream"] == before["downstream"]
    sixth = _run(cfg, moved, capsys, "--force", "transfer/supervised/classify/s0")
    assert [line.split()[-1] for line in sixth if line.startswith("[run ]")] == ["transfer/supervised/classify/s0"]
    stage = json.loads((moved / "stages" / "transfer" / "supervised" / "classify" / "s0" / "stage.json").read_text())
    assert str(tmp_path) not in json.dumps(stage), "a stage record names the study folder's absolute path"
    # and so does a copy
    copy = tmp_path / "copy"
    shutil.copytree(moved, copy)
    seventh = _run(cfg, copy, capsys)
    assert seventh and all(line.startswith("[skip]") for line in seventh)
    out = copy

    # the report opens in headless Chromium without console errors
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian chromium not installed: report screenshot not taken")
    shot = tmp_path / "report.png"
    r = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={tmp_path / 'chr'}", "--enable-logging=stderr", "--v=0",
                        f"--screenshot={shot}", "--window-size=1280,2000", (out / "report.html").as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000
    console_errors = [line for line in r.stderr.splitlines() if "CONSOLE" in line and "ERROR" in line.upper()]
    assert not console_errors, console_errors


def _strip(summary: dict) -> dict:
    """A summary without what differs between two equal studies: timings, folders, run ids."""
    drop = ("seconds", "paths", "stages", "time", "elapsed", "out", "img_per_s", "run_id", "started")
    if isinstance(summary, dict):
        return {k: _strip(v) for k, v in summary.items() if not any(d in k for d in drop)}
    if isinstance(summary, list):
        return [_strip(v) for v in summary]
    return summary


@pytest.mark.slow
def test_fan_out_stages_then_report_equals_a_sequential_study(tmp_path, capsys):
    """--list-stages runs nothing; --stage runs one stage (two pretrainings at once, in two processes); a stage
    whose inputs are not finished is refused; the plain command then runs the rest and writes the same report."""
    import sys

    cfg = tmp_path / "mini.yaml"
    cfg.write_text(MINI)
    seq = tmp_path / "seq"
    _run(cfg, seq, capsys)

    out = tmp_path / "fan"
    assert main(["reproduce", "--config", str(cfg), "--out", str(out), "--list-stages"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[-1] == f"0 of 19 stages cached in {out}" and not out.exists()
    assert any(line.startswith("probe ") and "after: pretrain/simmim, pretrain/supervised, pretrain/random" in line
               for line in listed)

    assert main(["reproduce", "--config", str(cfg), "--out", str(out), "--quiet", "--stage",
                 "transfer/simmim/classify/s0"]) == 2
    assert ("needs data/classify, which is not finished: run it first (--stage data/classify)"
            in capsys.readouterr().err)
    procs = [subprocess.Popen([sys.executable, "-m", "mimlab", "reproduce", "--config", str(cfg), "--out", str(out),
                               "--quiet", "--stage", f"pretrain/{m}"], stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})  # same sums
             for m in ("simmim", "supervised")]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()
    assert main(["reproduce", "--config", str(cfg), "--out", str(out), "--quiet", "--stage", "data/classify",
                 "--stage", "transfer/simmim/classify/s0"]) == 0
    capsys.readouterr()
    assert main(["reproduce", "--config", str(cfg), "--out", str(out), "--list-stages"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"4 of 19 stages cached in {out}"
    rest = _run(cfg, out, capsys)
    skipped = sorted(line.split()[1] for line in rest if line.startswith("[skip]"))
    assert skipped == ["data/classify", "pretrain/simmim", "pretrain/supervised", "transfer/simmim/classify/s0"]
    got = json.loads((out / "summary.json").read_text().replace(str(out), "<study>"))
    want = json.loads((seq / "summary.json").read_text().replace(str(seq), "<study>"))
    assert _strip(got) == _strip(want)


def test_a_bad_study_config_fails_before_any_stage(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(MINI.replace("ablation_blocks: 1", "ablation_blocks: 3"))    # the model has 3 blocks
    out = tmp_path / "study"
    assert main(["reproduce", "--config", str(cfg), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("ablation_blocks 3 would drop every block of a 3-block vit_tiny_patch16_224: use fewer "
                            "than 3"), err
    assert not (out / "stages").exists()


@pytest.mark.slow
def test_submitit_local_launcher_runs_every_stage(tmp_path, capsys):
    """submitit's local executor runs the stages wave by wave; the plain command then only writes the report."""
    from mimlab.reproduce.launch import waves
    from mimlab.reproduce.pipeline import Study
    from mimlab.reproduce.presets import load_config_file

    cfg = tmp_path / "mini.yaml"
    cfg.write_text(MINI)
    out = tmp_path / "sub"
    levels = waves(Study(load_config_file(str(cfg)), out, progress=False))
    assert [len(w) for w in levels] == [7, 12] and "probe" in levels[1]
    assert main(["reproduce", "--config", str(cfg), "--out", str(out), "--quiet", "--launcher", "submitit",
                 "--submitit-local"]) == 0
    assert "submitted 19 stage jobs" in capsys.readouterr().out
    rest = _run(cfg, out, capsys)
    assert rest and all(line.startswith("[skip]") for line in rest)
    assert (out / "report.html").is_file()


def test_pretrain_stage_killed_after_its_last_checkpoint_records_the_same_loss(tmp_path):
    """A study killed between a pretraining's final checkpoint and its stage record reruns the stage with nothing
    left to train: the loss it records (and the gate that reads it) must still be the whole run's, read from
    metrics.csv, not the empty list of steps that attempt ran."""
    from mimlab.reproduce.pipeline import Study
    from mimlab.reproduce.presets import load_config_file

    cfg = tmp_path / "mini.yaml"
    cfg.write_text(MINI)
    stage = Study(load_config_file(str(cfg)), tmp_path / "study", progress=False).pretrain_stage("supervised")
    d = tmp_path / "study" / "stages" / "pretrain" / "supervised"
    d.mkdir(parents=True)
    first = stage.build(d)
    again = stage.build(d)                  # resumes at step 4 of 4: trains nothing
    assert first["final_loss"] is not None and len(first["losses_head"]) == 4
    for k in ("steps", "final_loss", "losses_head", "model"):
        assert again[k] == first[k], k
    assert again["img_per_s"] is not None and again["img_per_s"] > 0   # from the logged intervals
