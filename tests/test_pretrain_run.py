"""End-to-end pretraining runs on tiny models: loss goes down, outputs load, exact resume, DDP, bad input."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from mimlab.cli import main
from mimlab.errors import MimlabError
from mimlab.pretrain.api import PretrainConfig, pretrain

ARCH = "vit_tiny_patch16_224"
KW = dict(img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2)
KW_TEXT = "img_size=16,patch_size=4,depth=2,embed_dim=32,num_heads=2"
DATA = "builtin?classes=4&per_class=8"


pytestmark = pytest.mark.usefixtures("one_thread", "isolated_cache")


def cfg(out, method="simmim", **kw) -> PretrainConfig:
    base = dict(method=method, model=ARCH, model_kwargs=dict(KW), data=DATA, out=out, steps=30, batch_size=16,
                lr=0.05, warmup_steps=3, schedule="cosine", tensorboard=False, progress=False, device="cpu",
                log_every=5)
    base.update(kw)
    return PretrainConfig(**base)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def mean(xs):
    return sum(xs) / len(xs)


@pytest.mark.parametrize("method", ["simmim", "mae", "supervised"])
def test_short_run_lowers_the_loss_and_exports_a_timm_encoder(tmp_path, method):
    from mimlab.models.factory import create_model

    steps = 90 if method == "supervised" else 30  # 4-way CE under strong crops needs a little longer
    res = pretrain(cfg(tmp_path / method, method, lr=0.3, steps=steps))
    assert res.step == steps and len(res.losses) == steps
    assert mean(res.losses[-6:]) < 0.85 * mean(res.losses[:6]), res.losses
    model, report = create_model(ARCH, KW, checkpoint=str(res.model_path))      # strict load, headless
    enc_sd = model.state_dict()
    from safetensors.torch import load_file

    saved = load_file(str(res.model_path))
    assert set(saved) == set(enc_sd) and not any("mask_token" in k or "decoder" in k or k.startswith("head.")
                                                 for k in saved)
    run = json.loads((tmp_path / method / "run.json").read_text())
    assert run["result"]["step"] == steps and run["lr"]["lr"] == pytest.approx(0.3 * 16 / 512)
    if method == "simmim":
        m = run["method_config"]["mask"]
        assert (m["mask_patch_size"], m["mask_cells"], m["masked_cells"]) == (4, [4, 4], 10)
        assert 1.5 < m["avg_dist_px"] < 3.5
    if method == "mae":
        assert run["method_config"]["mae"]["keep_tokens"] == 4
    rows = read_csv(tmp_path / method / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, steps + 1))


def test_cli_run_probe_every_and_out_dir_refusal(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["pretrain", "--method", "simmim", "--model", ARCH, "--model-kwargs", KW_TEXT, "--data", DATA,
            "--out", str(out), "--steps", "6", "--batch-size", "8", "--lr", "0.05", "--probe-every", "3",
            "--probe-images", "8", "--no-tensorboard", "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "SimMIM mask: 4 px cells on a 4x4 grid" in err and "AvgDist" in err
    probe = read_csv(out / "probe.csv")
    assert sorted({int(r["step"]) for r in probe}) == [0, 3, 6] and len(probe) == 3 * 2  # 2 layers
    for r in probe:
        d = float(r["attention_distance_px"])
        assert 0 < d < 16 * 2 ** 0.5 and float(r["head_kl"]) >= 0
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"   # the loss curve beside metrics.csv
    # a second run into the same directory is refused; --overwrite replaces it (loss.* included)
    assert main(args) == 2
    assert "already holds a run's checkpoint" in capsys.readouterr().err
    assert main(args[:-6] + ["--steps", "2", "--overwrite", "--no-tensorboard", "--no-progress",
                             "--figure-format", "svg"]) == 0
    assert (out / "loss.svg").is_file()
    with pytest.raises(SystemExit) as exit_:        # argparse refuses it before any work
        main(args[:-6] + ["--steps", "2", "--overwrite", "--figure-format", "eps"])
    assert exit_.value.code == 2
    assert "'eps' is not one of png, pdf, svg" in capsys.readouterr().err


def test_kill_and_resume_reaches_the_same_parameters(tmp_path):
    from safetensors.torch import load_file

    ref = pretrain(cfg(tmp_path / "ref", steps=8, deterministic=True))
    stopped = pretrain(cfg(tmp_path / "run", steps=8, deterministic=True, save_every=3, stop_after=5))
    assert stopped.model_path is None and stopped.step == 5
    res = pretrain(cfg(tmp_path / "run", steps=8, deterministic=True, save_every=3, resume=True))
    assert res.train.start_step == 3 and res.step == 8
    a, b = load_file(str(ref.model_path)), load_file(str(res.model_path))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in read_csv(tmp_path / "run" / "metrics.csv")] == \
           [r["loss"] for r in read_csv(tmp_path / "ref" / "metrics.csv")]


def test_ema_weights_are_exported_beside_the_model(tmp_path):
    from safetensors.torch import load_file

    from mimlab.models.factory import create_model

    res = pretrain(cfg(tmp_path / "ema", "mae", steps=4, ema_decay=0.5, warmup_steps=0))
    ema_path = tmp_path / "ema" / "model_ema.safetensors"
    create_model(ARCH, KW, checkpoint=str(ema_path))                        # strict load
    a, b = load_file(str(res.model_path)), load_file(str(ema_path))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigkill_then_resume_from_the_command_line(tmp_path):
    """A real `kill -9` mid-run; `--resume` finishes with the same weights as an uninterrupted run."""
    from safetensors.torch import load_file

    def cmd(out, *extra):
        return [sys.executable, "-m", "mimlab", "pretrain", "--method", "mae", "--model", ARCH, "--model-kwargs",
                KW_TEXT, "--data", DATA, "--out", str(out), "--steps", "60", "--batch-size", "8", "--lr", "0.05",
                "--seed", "3", "--deterministic", "--no-tensorboard", "--no-progress", "--device", "cpu",
                "--save-every", "2", *extra]

    env = dict(os.environ, OMP_NUM_THREADS="1")
    ref = pretrain(cfg(tmp_path / "ref", "mae", steps=60, batch_size=8, seed=3, deterministic=True,
                       warmup_steps=None, schedule=None, log_every=10))
    proc = subprocess.Popen(cmd(tmp_path / "run"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and (tmp_path / "run" / "metrics.csv").exists() and \
                len(read_csv(tmp_path / "run" / "metrics.csv")) >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run" / "model.safetensors").exists()
    done = subprocess.run(cmd(tmp_path / "run", "--resume"), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stderr
    a, b = load_file(str(ref.model_path)), load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = read_csv(tmp_path / "run" / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 61))


@pytest.mark.slow
def test_torchrun_two_process_gloo_matches_one_process(tmp_path):
    from safetensors.torch import load_file

    one = pretrain(cfg(tmp_path / "one", steps=4, batch_size=16))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mimlab", "pretrain", "--method", "simmim", "--model", ARCH, "--model-kwargs", KW_TEXT,
           "--data", DATA, "--out", str(tmp_path / "two"), "--steps", "4", "--batch-size", "16", "--lr", "0.05",
           "--warmup-steps", "3", "--schedule", "cosine", "--no-tensorboard", "--no-progress", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = load_file(str(one.model_path)), load_file(str(tmp_path / "two" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    l1 = [float(r["loss"]) for r in read_csv(tmp_path / "one" / "metrics.csv")]
    l2 = [float(r["loss"]) for r in read_csv(tmp_path / "two" / "metrics.csv")]
    assert l2 == pytest.approx(l1, rel=1e-4)
    assert len(torch.load(tmp_path / "two" / "checkpoints" / "last.pt", weights_only=True)["rng"]) == 2


def _image_folder(root: Path, n_per_class: int = 4, bad: bool = True) -> Path:
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            Image.new("RGB", (20, 20), color=(40 * i, 100 if c == "cat" else 10, 7)).save(root / c / f"{i}.png")
    if bad:
        (root / "dog" / "broken.jpg").write_bytes(b"not an image at all")
    return root


def test_unreadable_images_fail_by_path_or_are_skipped_and_counted(tmp_path):
    data = _image_folder(tmp_path / "imgs")
    with pytest.raises(MimlabError, match=r"broken\.jpg.*bad_images='skip'"):
        pretrain(cfg(tmp_path / "fail", "supervised", data=str(data), steps=3, batch_size=9))
    res = pretrain(cfg(tmp_path / "skip", "supervised", data=str(data), steps=3, batch_size=9, bad_images="skip"))
    assert res.train.skipped_samples == 3                     # the one broken file, read once per step
    assert json.loads((tmp_path / "skip" / "run.json").read_text())["result"]["skipped_images"] == 3


def test_too_small_dataset_and_flat_folder_for_supervised(tmp_path):
    data = _image_folder(tmp_path / "imgs", bad=False)
    with pytest.raises(MimlabError, match="batch_size 16: the dataset has 8 samples, fewer than one batch"):
        pretrain(cfg(tmp_path / "a", data=str(data), steps=2, batch_size=16))
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (16, 16)).save(flat / "x.png")
    with pytest.raises(MimlabError, match="needs >= 2 class folders"):
        pretrain(cfg(tmp_path / "b", "supervised", data=str(flat), steps=2, batch_size=1))
    with pytest.raises(MimlabError, match="unknown built-in kind"):
        pretrain(cfg(tmp_path / "c", data="builtin:nope"))


def test_crop_scale_option_is_used_recorded_and_validated(tmp_path, capsys):
    res = pretrain(cfg(tmp_path / "crop", "supervised", steps=2, crop_scale=(0.5, 0.9)))
    run = json.loads((tmp_path / "crop" / "run.json").read_text())
    assert res.step == 2 and run["data"]["augmentation"]["random_resized_crop_scale"] == [0.5, 0.9]
    default = pretrain(cfg(tmp_path / "default", "supervised", steps=1))
    assert default.run["data"]["augmentation"]["random_resized_crop_scale"] == [0.08, 1.0]
    for bad in [(0.0, 1.0), (0.9, 0.5), (0.5, 1.5)]:
        with pytest.raises(MimlabError, match="crop_scale must be LOW,HIGH"):
            pretrain(cfg(tmp_path / "bad", "supervised", steps=1, crop_scale=bad))
    with pytest.raises(SystemExit) as exit_info:                  # argparse: usage line + message, exit 2
        main(["pretrain", "--method", "simmim", "--model", ARCH, "--model-kwargs", KW_TEXT, "--data", DATA,
              "--out", str(tmp_path / "cli"), "--steps", "1", "--batch-size", "8", "--crop-scale", "0.5",
              "--no-progress", "--no-tensorboard"])
    assert exit_info.value.code == 2 and "LOW,HIGH" in capsys.readouterr().err
