"""Real-format loaders on small generated fixtures, including malformed files."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from mimlab.errors import MimlabError
from mimlab.transfer.datasets.coco_keypoints import (COCO_SIGMAS, DEFAULT_SIGMA, find_coco_splits, flip_pairs,
                                                     keypoint_sigmas, load_coco_keypoints, parse_flip_pairs)
from mimlab.transfer.datasets.common import load_depth_png, load_rgb
from mimlab.transfer.datasets.depth import crop_mask, find_depth_splits, read_split_file
from mimlab.transfer.datasets.imagefolder import find_imagefolder
from mimlab.transfer.datasets.tracking import find_tracking_splits, load_sequence, parse_groundtruth
from mimlab.data.downstream import generate
from mimlab.data.downstream.finegrained import class_names
from mimlab.data.downstream.keypoints import KEYPOINT_NAMES


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate("finegrained", root / "fg", num_classes=3, train_per_class=3, val_per_class=2, size=16)
    generate("keypoints", root / "kp", train_images=3, val_images=2, size=32)
    generate("depth", root / "depth", train_images=3, val_images=2, width=24, height=16)
    generate("tracking", root / "trk", train_sequences=2, val_sequences=1, length=4, size=32)
    return root


def _copy(synth, name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(synth / name, dst)
    return dst


# ---------------------------------------------------------------------------------------------------- generators
def test_generators_are_seeded(synth, tmp_path):
    generate("depth", tmp_path / "again", train_images=3, val_images=2, width=24, height=16)
    a = np.asarray(Image.open(synth / "depth" / "train" / "depth_00001.png"))
    b = np.asarray(Image.open(tmp_path / "again" / "train" / "depth_00001.png"))
    assert np.array_equal(a, b)
    with pytest.raises(MimlabError, match="not empty"):
        generate("depth", tmp_path / "again", train_images=1, val_images=1)
    with pytest.raises(MimlabError, match="unknown parameter"):
        generate("depth", tmp_path / "x", colour=3)


# --------------------------------------------------------------------------------------------------- ImageFolder
def test_imagefolder(synth, tmp_path):
    train, val = find_imagefolder(synth / "fg")
    assert train.classes == sorted(class_names(3)) and val.classes == train.classes
    assert len(train.samples) == 9 and len(val.samples) == 6
    assert train.labels == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert load_rgb(train.samples[0][0]).shape == (16, 16, 3)
    d = _copy(synth, "fg", tmp_path)
    shutil.rmtree(d / "val" / class_names(3)[1])
    with pytest.raises(MimlabError, match="missing"):
        find_imagefolder(d)
    (d / "val" / class_names(3)[1]).mkdir()
    with pytest.raises(MimlabError, match="no image files"):
        find_imagefolder(d)
    (d / "train" / class_names(3)[0] / "00000.png").write_bytes(b"not a png")
    with pytest.raises(MimlabError, match="00000.png"):
        load_rgb(d / "train" / class_names(3)[0] / "00000.png")


# ------------------------------------------------------------------------------------------------ COCO keypoints
def test_coco_keypoints_roundtrip(synth):
    splits = find_coco_splits(synth / "kp")
    ks = load_coco_keypoints(*splits["train"])
    raw = json.loads(splits["train"][0].read_text())
    assert ks.names == KEYPOINT_NAMES and ks.num_keypoints == 13
    assert len(ks.instances) == len(raw["annotations"])
    first = raw["annotations"][0]
    assert np.allclose(ks.instances[0].keypoints.ravel(), first["keypoints"])
    assert np.allclose(ks.instances[0].bbox, first["bbox"])
    assert splits["val"][1] == synth / "kp" / "val"


def test_flip_pairs_and_sigmas():
    pairs = flip_pairs(KEYPOINT_NAMES)
    assert (1, 2) in pairs and (11, 12) in pairs and len(pairs) == 6
    assert parse_flip_pairs("1:2, 3:4", 5) == [(1, 2), (3, 4)]
    with pytest.raises(MimlabError):
        parse_flip_pairs("1:9", 5)
    s = keypoint_sigmas(["head", "left_shoulder", "right_ankle"])
    assert s == pytest.approx([DEFAULT_SIGMA, COCO_SIGMAS["left_shoulder"], 0.089])
    assert keypoint_sigmas(["a", "b"], [0.05]) == pytest.approx([0.05, 0.05])
    with pytest.raises(MimlabError, match="3 keypoints"):
        keypoint_sigmas(["a", "b", "c"], [0.1, 0.2])


def _edit_ann(path, fn):
    coco = json.loads(path.read_text())
    fn(coco)
    path.write_text(json.dumps(coco))


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("annotations"), "missing or non-list 'annotations'"),
    (lambda c: c["annotations"][0].pop("area"), "missing 'area'"),
    (lambda c: c["annotations"][0].__setitem__("bbox", [1, 2, 3]), "malformed bbox"),
    (lambda c: c["annotations"][0].__setitem__("bbox", [1, 2, 0, 5]), "malformed bbox"),
    (lambda c: c["annotations"][0].__setitem__("keypoints", [1, 2, 2]), "must hold 39 numbers"),
    (lambda c: c["annotations"][0]["keypoints"].__setitem__(2, 3), "visibility"),
    (lambda c: c["annotations"][0].__setitem__("image_id", 999), "image_id 999"),
    (lambda c: c["categories"][0].pop("keypoints"), "no category"),
])
def test_coco_malformed(synth, tmp_path, edit, message):
    d = _copy(synth, "kp", tmp_path)
    ann = d / "annotations" / "person_keypoints_train.json"
    _edit_ann(ann, edit)
    with pytest.raises(MimlabError, match=message) as e:
        load_coco_keypoints(ann, d / "train")
    assert str(ann) in str(e.value)


def test_coco_bad_json_and_missing_image(synth, tmp_path):
    d = _copy(synth, "kp", tmp_path)
    ann = d / "annotations" / "person_keypoints_train.json"
    ann.write_text(ann.read_text()[:-20])
    with pytest.raises(MimlabError, match="not valid JSON") as e:
        load_coco_keypoints(ann, d / "train")
    assert str(ann) in str(e.value)
    d2 = _copy(synth, "kp", tmp_path / "b")
    (d2 / "val" / "000001.png").unlink()
    with pytest.raises(MimlabError, match="image file not found") as e:
        load_coco_keypoints(d2 / "annotations" / "person_keypoints_val.json", d2 / "val")
    assert "000001.png" in str(e.value)


# ------------------------------------------------------------------------------------------------------- depth
def test_depth_split_and_png(synth):
    train_file, val_file = find_depth_splits(synth / "depth")
    samples = read_split_file(train_file, synth / "depth")
    assert len(samples) == 3 and samples[0].focal is not None
    raw = np.asarray(Image.open(samples[0].depth)).astype(np.float64)
    d = load_depth_png(samples[0].depth, 1000.0)
    assert d.dtype == np.float32 and np.allclose(d, raw / 1000.0)
    assert (d == 0).sum() == (raw == 0).sum()  # invalid stays 0
    assert 0 < d.max() <= 10.0


def test_depth_wrong_bit_depth_and_bad_split(synth, tmp_path):
    p8 = tmp_path / "d8.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(p8)
    with pytest.raises(MimlabError, match="8-bit") as e:
        load_depth_png(p8, 1000.0)
    assert str(p8) in str(e.value)
    prgb = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(prgb)
    with pytest.raises(MimlabError, match="RGB"):
        load_depth_png(prgb, 256.0)
    split = tmp_path / "train.txt"
    split.write_text("a.png b.png 500 extra\n")
    with pytest.raises(MimlabError, match=r"train.txt:1: expected"):
        read_split_file(split, tmp_path)
    split.write_text("a.png b.png\n")
    with pytest.raises(MimlabError, match="image not found"):
        read_split_file(split, tmp_path)
    split.write_text(f"{prgb.name} None\n{prgb.name} {p8.name} 518.8\n")
    s = read_split_file(split, tmp_path)  # "None" (no ground truth) is skipped
    assert len(s) == 1 and s[0].focal == pytest.approx(518.8)
    with pytest.raises(MimlabError, match="no split file"):
        find_depth_splits(tmp_path / "..")


def test_depth_crops():
    m = crop_mask((480, 640), "nyu_eigen")
    rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
    assert (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1) == (45, 471, 41, 601)
    g = crop_mask((375, 1242), "garg")
    assert g.any(1).nonzero()[0].min() == int(0.40810811 * 375)
    with pytest.raises(MimlabError):
        crop_mask((4, 4), "square")


# ---------------------------------------------------------------------------------------------------- tracking
def test_got10k_layout(synth):
    train, val = find_tracking_splits(synth / "trk")
    assert [s.name for s in train] == ["GOT-10k_Train_000001", "GOT-10k_Train_000002"]
    assert len(val) == 1 and len(val[0].frames) == 4 and val[0].frames[0].name == "00000001.jpg"
    gt = np.loadtxt(synth / "trk" / "val" / "GOT-10k_Val_000001" / "groundtruth.txt", delimiter=",")
    assert np.allclose(val[0].boxes, gt) and val[0].valid.all()


def test_groundtruth_separators_and_errors(tmp_path):
    p = tmp_path / "groundtruth.txt"
    p.write_text("1,2,3,4\n5\t6\t7\t8\n9 10 11 12\nNaN,NaN,NaN,NaN\n")
    b = parse_groundtruth(p)
    assert np.allclose(b[:3], [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]) and np.isnan(b[3]).all()
    p.write_text("1,2,3,4\n1,2,3\n")
    with pytest.raises(MimlabError, match=r"groundtruth.txt:2: expected 4 numbers"):
        parse_groundtruth(p)
    p.write_text("1,2,x,4\n")
    with pytest.raises(MimlabError, match="not numbers"):
        parse_groundtruth(p)


def test_missing_frame_named(synth, tmp_path):
    d = _copy(synth, "trk", tmp_path)
    seq = d / "val" / "GOT-10k_Val_000001"
    (seq / "00000003.jpg").unlink()
    with pytest.raises(MimlabError, match="00000003.jpg"):
        load_sequence(seq)
    (d / "val" / "list.txt").write_text("GOT-10k_Val_000001\nGOT-10k_Val_000099\n")
    with pytest.raises(MimlabError, match="GOT-10k_Val_000099"):
        find_tracking_splits(d)


def test_lasot_layout(synth, tmp_path):
    root = tmp_path / "lasot"
    src = synth / "trk" / "train"
    for i, name in enumerate(["GOT-10k_Train_000001", "GOT-10k_Train_000002"]):
        seq = root / "cat" / f"cat-{i + 1}"
        shutil.copytree(src / name, seq / "img", ignore=shutil.ignore_patterns("groundtruth.txt"))
        # LaSOT separates with commas too; write tabs to exercise the other separator
        boxes = np.loadtxt(src / name / "groundtruth.txt", delimiter=",")
        (seq / "groundtruth.txt").write_text("".join("\t".join(f"{v:g}" for v in b) + "\n" for b in boxes))
    (root / "testing_set.txt").write_text("cat-2\n")
    train, test = find_tracking_splits(root)
    assert [s.name for s in train] == ["cat-1"] and [s.name for s in test] == ["cat-2"]
    assert test[0].frames[0].parent.name == "img" and len(test[0].frames) == 4


def test_data_subcommand_hook(tmp_path, capsys):
    import argparse

    from mimlab.cli.data import add_downstream_subcommands, run_downstream_subcommand

    parser = argparse.ArgumentParser(prog="mimlab data")
    add_downstream_subcommands(parser.add_subparsers(dest="kind", required=True))
    args = parser.parse_args(["tracking", "--out", str(tmp_path / "t"), "--train-sequences", "1",
                              "--val-sequences", "1", "--length", "3", "--size", "32", "--seed", "5"])
    assert run_downstream_subcommand(args) == 0 and "wrote tracking dataset" in capsys.readouterr().out
    train, val = find_tracking_splits(tmp_path / "t")
    assert len(train) == 1 and len(val[0].frames) == 3
    assert json.loads((tmp_path / "t" / "dataset.json").read_text())["seed"] == 5
