"""`mimlab probe` end to end, and its one-line errors for bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from mimlab.cli import main

KW = "img_size=32,patch_size=4,depth=2,embed_dim=32,num_heads=2"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for c in ("b", "a"):
        (root / c).mkdir()
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_probe_folder_end_to_end(folder, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["probe", "a=vit_tiny_patch16_224", "b=deit_tiny_distilled_patch16_224", "--model-kwargs", KW,
               "--data", str(folder), "--images", "8", "--batch-size", "4", "--out", str(out), "--bootstrap", "20",
               "--workers", "0", "--quiet"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_images"] == 8
    assert set(m["cka"]) == {"a/a", "a/b", "b/a", "b/b"}
    a = m["models"]["a"]
    assert a["random_init"] is True and a["num_prefix_tokens"] == 1 and a["grid"] == [8, 8]
    assert m["models"]["b"]["num_prefix_tokens"] == 2
    layer = a["layers"][0]
    for key in ("attention_distance_px", "attention_distance_norm", "head_kl", "head_js", "entropy",
                "prefix_mass", "nmi"):
        assert len(layer[key]) == 2
    # files sorted by relative path: a/0.png .. a/4.png, b/0.png .. b/2.png
    assert m["provenance"]["data"]["first_file"].endswith("a/0.png")
    assert m["provenance"]["data"]["last_file"].endswith("b/2.png")
    for f in ("report.html", "heads.csv", "layers.csv", "cka.csv"):
        assert (out / f).is_file()


def test_probe_npy_and_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, **dict(
        img_size=32, patch_size=4, depth=2, embed_dim=32, num_heads=2))
    from mimlab.models.checkpoints import save_state_dict
    ckpt = tmp_path / "m.safetensors"
    save_state_dict(model, ckpt)
    x = np.random.default_rng(0).standard_normal((6, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    rc = main(["probe", f"m=vit_tiny_patch16_224@{ckpt}", "--model-kwargs", KW, "--data", str(tmp_path / "x.npy"),
               "--images", "6", "--batch-size", "6", "--out", str(tmp_path / "o"), "--no-report", "--quiet"])
    assert rc == 0
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())["models"]["m"]
    assert m["random_init"] is False and len(m["checkpoint_sha256"]) == 64
    # the same numbers as probing the in-memory model directly
    from mimlab.probe.api import ProbeConfig, probe
    direct = probe({"m": model}, torch.from_numpy(x), config=ProbeConfig(batch_size=6))
    assert m["layers"][1]["head_kl"] == pytest.approx(direct.models["m"]["layers"][1]["head_kl"], rel=1e-6)


def _err(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    return err[-1]


def test_bad_inputs_give_one_line_errors(folder, tmp_path, capsys):
    base = ["probe", "vit_tiny_patch16_224", "--model-kwargs", KW, "--workers", "0", "--quiet"]
    assert "no such file or directory" in _err(capsys, base + ["--data", str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    assert "no images found" in _err(capsys, base + ["--data", str(tmp_path / "empty")])
    assert "holds only 10 images" in _err(capsys, base + ["--data", str(folder), "--images", "11"])
    bad = tmp_path / "badimgs"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"not a png")
    msg = _err(capsys, base + ["--data", str(bad), "--images", "1", "--no-cka"])
    assert "cannot read image" in msg and "x.png" in msg
    assert "unknown architecture 'vitt_tiny'" in _err(capsys, ["probe", "vitt_tiny", "--data", str(folder)])
    # checkpoint of another architecture: the key mismatch is listed
    other = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=4, depth=3,
                              embed_dim=32, num_heads=2)
    from mimlab.models.checkpoints import save_state_dict
    save_state_dict(other, tmp_path / "other.pth")
    msg = _err(capsys, ["probe", f"vit_tiny_patch16_224@{tmp_path / 'other.pth'}", "--model-kwargs", KW,
                        "--data", str(folder)])
    assert "blocks.2" in msg
    assert "does not exist" in _err(capsys, ["probe", f"vit_tiny_patch16_224@{tmp_path / 'nope.pth'}",
                                             "--data", str(folder)])
    np.save(tmp_path / "bad.npy", np.zeros((2, 4, 32, 32), np.float32))
    assert "N x 3 x H x W" in _err(capsys, base + ["--data", str(tmp_path / "bad.npy")])


def test_cli_error_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mimlab", "probe", "vit_tiny_patch16_224", "--data",
                        str(tmp_path / "missing")], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"mimlab probe: error: --data {tmp_path / 'missing'}: no such file or directory"]


def test_count_errors_come_before_any_model_is_built(folder, capsys, monkeypatch):
    """CKA without a minibatch of 4, more maps than images, more images than the data: refused before a model is
    built or an image is read (build_models is made to fail, so reaching it would show)."""
    import mimlab.probe.run as run

    def boom(cfg):
        raise AssertionError("build_models was reached")

    monkeypatch.setattr(run, "build_models", boom)
    base = ["probe", "vit_tiny_patch16_224", "--model-kwargs", KW, "--workers", "0", "--quiet", "--data"]
    msg = _err(capsys, base + ["builtin", "--images", "3", "--batch-size", "3"])
    assert msg.startswith("mimlab probe: error: --batch-size 3 with 3 image(s) leaves CKA no minibatch of at least 4"), msg
    assert "--no-cka" in msg
    msg = _err(capsys, base + [str(folder), "--images", "6", "--batch-size", "3"])   # 3 + 3: no batch of 4
    assert "--batch-size 3 with 6 image(s)" in msg
    assert "--maps 5 asks for the maps of more images than the run has (4)" in _err(
        capsys, base + ["builtin", "--images", "4", "--maps", "5"])
    assert "holds only 10 images" in _err(capsys, base + [str(folder), "--images", "11"])


def test_data_defaults_to_builtin_with_a_note(tmp_path, capsys):
    assert main(["probe", "vit_tiny_patch16_224", "--model-kwargs", KW, "--images", "4", "--batch-size", "4",
                 "--bootstrap", "0", "--workers", "0", "--quiet", "--no-report", "--out", str(tmp_path / "o")]) == 0
    assert "note: --data not given: probing the built-in images (--data builtin)" in capsys.readouterr().err
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["provenance"]["data"]["kind"] == "builtin"


def test_threads_option_sets_torch_threads_for_the_run_and_records_them(tmp_path, capsys, monkeypatch):
    import torch

    seen = []
    import mimlab.probe.run as run_mod
    real = run_mod.run_probe
    monkeypatch.setattr(run_mod, "run_probe", lambda cfg, **kw: (seen.append(torch.get_num_threads()), real(cfg, **kw))[1])
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    out = tmp_path / "t"
    assert main(["probe", "vit_tiny_patch16_224", "--model-kwargs", KW, "--images", "8", "--batch-size", "4",
                 "--bootstrap", "0", "--threads", str(want), "--out", str(out)]) == 0
    assert seen == [want] and torch.get_num_threads() == before            # set for the run, put back after
    assert json.loads((out / "metrics.json").read_text())["provenance"]["torch_threads"] == want
    assert main(["probe", "vit_tiny_patch16_224", "--threads", "0", "--out", str(tmp_path / "z")]) == 2
    assert "--threads must be >= 1, got 0" in capsys.readouterr().err and not (tmp_path / "z").exists()
