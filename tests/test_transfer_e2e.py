"""Tiny end-to-end runs of `mimlab transfer` (one per task) on generated data, through the CLI."""
from __future__ import annotations

import json

import pytest
import torch

from mimlab.cli import main
from mimlab.data.downstream import generate

KW = "img_size=16,patch_size=4,depth=2,embed_dim=32,num_heads=2"
COMMON = ["--backbone", "vit_tiny_patch16_224", "--model-kwargs", KW, "--steps", "2", "--batch-size", "4",
          "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    generate("finegrained", root / "fg", num_classes=3, train_per_class=3, val_per_class=2, size=16)
    generate("keypoints", root / "kp", train_images=3, val_images=2, size=32)
    generate("depth", root / "depth", train_images=4, val_images=2, width=20, height=16)
    generate("tracking", root / "trk", train_sequences=2, val_sequences=2, length=5, size=32)
    return root


EXPECTED = {
    "classify": ("fg", {"top1", "mean_class_acc"}),
    "keypoints": ("kp", {"ap", "ap50", "ap75", "ar"}),
    "depth": ("depth", {"abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "delta1", "delta2", "delta3"}),
    "track": ("trk", {"suc", "precision", "norm_precision"}),
}


@pytest.mark.parametrize("task", list(EXPECTED))
def test_each_task_writes_metrics(task, data, tmp_path):
    sub, names = EXPECTED[task]
    out = tmp_path / task
    assert main(["transfer", "--task", task, "--data", str(data / sub), "--out", str(out), *COMMON]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["task"] == task and report["backbone"]["arch"] == "vit_tiny_patch16_224"
    assert set(report["metrics"]) == names and names <= set(report["baseline"])
    assert all(isinstance(v, float) for v in report["metrics"].values())
    assert report["train"]["steps"] == 2 and (out / "checkpoints" / "last.pt").is_file()
    assert "provenance" in report and (out / "metrics.csv").is_file()
    if task == "depth":   # every built-in evaluation image has valid pixels: none left unscored
        assert report["data"]["num_val_without_valid_depth"] == 0
    if task == "track":
        assert report["data"]["num_train_sequences_dropped"] == 0


def test_baselines_have_their_known_values(data, tmp_path):
    out = tmp_path / "b"
    assert main(["transfer", "--task", "classify", "--data", str(data / "fg"), "--out", str(out), *COMMON]) == 0
    b = json.loads((out / "metrics.json").read_text())["baseline"]
    assert b["top1"] == pytest.approx(1 / 3) and b["mean_class_acc"] == pytest.approx(1 / 3)  # balanced 3 classes
    out = tmp_path / "t"
    assert main(["transfer", "--task", "track", "--data", str(data / "trk"), "--out", str(out), *COMMON]) == 0
    r = json.loads((out / "metrics.json").read_text())
    assert r["baseline"]["suc"] < 20 / 21  # the target moves, so a stationary box is not perfect


def test_linear_mode_keeps_backbone_and_ablation_recorded(data, tmp_path):
    from mimlab.transfer.api import TransferConfig, run_transfer

    report = run_transfer(TransferConfig(
        "classify", "vit_tiny_patch16_224", data / "fg", tmp_path / "lin",
        model_kwargs=dict(img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2), steps=2, batch_size=4,
        mode="linear", progress=False, drop_last_blocks=1))
    assert report["backbone"]["drop_last_blocks"] == 1 and report["backbone"]["num_blocks"] == 1
    assert report["train"]["trainable_params"] == 32 * 3 + 3
    state = torch.load(tmp_path / "lin" / "checkpoints" / "last.pt", weights_only=True)["model"]
    torch.manual_seed(0)
    from mimlab.transfer.backbone import build_backbone

    fresh = build_backbone("vit_tiny_patch16_224", dict(img_size=16, patch_size=4, depth=2, embed_dim=32,
                                                        num_heads=2), drop_last=1, seed=0)
    for k, v in fresh.model.state_dict().items():
        assert torch.equal(state[f"backbone.model.{k}"], v)  # frozen: identical to the initial backbone


def test_out_dir_guard_and_errors(data, tmp_path, capsys):
    out = tmp_path / "g"
    args = ["transfer", "--task", "depth", "--data", str(data / "depth"), "--out", str(out), *COMMON]
    assert main(args) == 0
    assert main(args) == 2 and "--resume" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    assert main(args + ["--resume", "--steps", "3"]) == 0
    assert json.loads((out / "metrics.json").read_text())["train"]["resumed_from"] == 2
    bad = ["transfer", "--task", "depth", "--data", str(data / "fg"), "--out", str(tmp_path / "x"), *COMMON]
    assert main(bad) == 2 and "train.txt" in capsys.readouterr().err
    wrong = ["transfer", "--task", "depth", "--data", str(data / "depth"), "--out", str(tmp_path / "y"),
             "--pool", "cls", *COMMON]
    assert main(wrong) == 2 and "--pool" in capsys.readouterr().err


def test_transfer_from_pretrain_checkpoint(data, tmp_path):
    """`mimlab pretrain`'s exported encoder loads without conversion (strictly), into a different input size."""
    from mimlab.pretrain.api import PretrainConfig, pretrain

    kw = dict(img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2)
    res = pretrain(PretrainConfig(method="simmim", model="vit_tiny_patch16_224", data=str(data / "fg" / "train"),
                                  out=tmp_path / "pre", model_kwargs=kw, steps=2, batch_size=4, progress=False,
                                  tensorboard=False, device="cpu"))
    ckpt = res.model_path
    out = tmp_path / "tr"
    assert main(["transfer", "--task", "keypoints", "--data", str(data / "kp"), "--out", str(out),
                 *COMMON[:2], "--backbone", f"mim=vit_tiny_patch16_224@{ckpt}", "--model-kwargs",
                 "img_size=24,patch_size=4,depth=2,embed_dim=32,num_heads=2", "--steps", "1", "--batch-size", "2",
                 "--no-progress", "--device", "cpu"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["backbone"]["label"] == "mim" and report["backbone"]["load_report"]["num_loaded"] > 0
    assert report["data"]["input_size"] == [24, 24]


def test_no_checkpoint_warns_loudly_and_is_recorded(data, tmp_path, capsys):
    out = tmp_path / "rand"
    assert main(["transfer", "--task", "classify", "--data", str(data / "fg"), "--out", str(out), *COMMON,
                 "--num-workers", "0"]) == 0
    err = capsys.readouterr().err
    assert "note: --num-workers is deprecated; use --workers" in err      # the old spelling still works
    assert ("WARNING: vit_tiny_patch16_224 has no checkpoint: RANDOM INITIALISATION (seed 0); this transfer "
            "measures an untrained backbone") in err
    assert json.loads((out / "metrics.json").read_text())["backbone"]["random_init"] is True


def test_crop_scale_is_low_high_like_pretrain_and_one_number_still_works(data, tmp_path, capsys):
    from mimlab.errors import ConfigError
    from mimlab.transfer.tasks.options import area_range

    assert area_range("0.5,0.9") == (0.5, 0.9) and area_range((0.3, 1)) == (0.3, 1.0) and area_range(0.8) == (0.8, 1.0)
    for bad in ("0.9,0.5", "0,1", "1.2", "a,b", "0.1,0.2,0.3"):
        with pytest.raises(ConfigError, match="crop_scale"):
            area_range(bad)
    metrics = {}
    for form in ("0.5", "0.5,1"):
        out = tmp_path / form
        assert main(["transfer", "--task", "classify", "--data", str(data / "fg"), "--out", str(out), *COMMON,
                     "--crop-scale", form]) == 0
        err = capsys.readouterr().err
        assert ("note: --crop-scale 0.5 (one number) is deprecated; use --crop-scale 0.5,1" in err) == (form == "0.5")
        metrics[form] = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["0.5"] == metrics["0.5,1"]                 # the same crops: LOW means LOW,1
    assert main(["transfer", "--task", "classify", "--data", str(data / "fg"), "--out", str(tmp_path / "bad"),
                 *COMMON, "--crop-scale", "0.9,0.5"]) == 2
    assert "--crop-scale must be LOW,HIGH" in capsys.readouterr().err and not (tmp_path / "bad" / "metrics.json").exists()
