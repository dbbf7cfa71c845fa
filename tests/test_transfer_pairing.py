"""Paired seeds: transfer seed s gives every backbone of one architecture the same training batches (data order and
augmentation) and the same head initialisation, so the study may compare models by per-seed differences
(claims C4-C6, `mimlab.reproduce.claims.paired_interval`)."""
from __future__ import annotations

import hashlib

import pytest
import torch

import mimlab.engine as engine
from mimlab.data.downstream import generate
from mimlab.transfer.api import TransferConfig, run_transfer

ARCH = "vit_tiny_patch16_224"
REAL_TRAIN = engine.train
KW = {"img_size": 16, "patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from mimlab.models.factory import create_model

    root = tmp_path_factory.mktemp("pairing")
    generate("finegrained", root / "classify", num_classes=3, train_per_class=3, val_per_class=2, size=16)
    generate("keypoints", root / "keypoints", train_images=3, val_images=2, size=32)
    generate("depth", root / "depth", train_images=4, val_images=2, width=20, height=16)
    generate("tracking", root / "track", train_sequences=2, val_sequences=2, length=5, size=32)
    for name, seed in (("a", 1), ("b", 2)):         # two different "pretrained" backbones of one architecture
        torch.manual_seed(seed)
        model, _ = create_model(ARCH, KW, checkpoint=None, num_classes=0)
        torch.save(model.state_dict(), root / f"{name}.pth")
    return root


def _digest(x) -> str:
    h = hashlib.sha256()

    def visit(v):
        if isinstance(v, torch.Tensor):
            h.update(str((v.dtype, tuple(v.shape))).encode())
            h.update(v.detach().contiguous().cpu().numpy().tobytes())
        elif isinstance(v, dict):
            for k in sorted(v):
                h.update(str(k).encode())
                visit(v[k])
        elif isinstance(v, (list, tuple)):
            for e in v:
                visit(e)
        else:
            h.update(repr(v).encode())
    visit(x)
    return h.hexdigest()


def _record(monkeypatch, cfg: TransferConfig) -> dict:
    """What the engine receives: the head's initial weights and every training batch, as digests."""
    seen: dict = {"batches": []}

    def spy(model, loss_fn, dataset, tcfg, **kw):
        seen["head"] = _digest({k: v for k, v in model.head.state_dict().items()})
        seen["backbone"] = _digest(model.backbone.state_dict())

        def loss(m, batch):
            seen["batches"].append(_digest(batch))
            return loss_fn(m, batch)
        return REAL_TRAIN(model, loss, dataset, tcfg, **kw)

    monkeypatch.setattr(engine, "train", spy)
    run_transfer(cfg)
    return seen


@pytest.mark.parametrize("task", ["classify", "keypoints", "depth", "track"])
def test_one_seed_gives_every_backbone_the_same_batches_and_head(task, setup, tmp_path, monkeypatch):
    def cfg(spec: str, seed: int, drop: int = 0) -> TransferConfig:
        return TransferConfig(task=task, backbone=spec, data=setup / task, out=tmp_path / f"{spec[0]}{seed}{drop}",
                              model_kwargs=KW, steps=3, batch_size=2, seed=seed, device="cpu", progress=False,
                              drop_last_blocks=drop)

    a = _record(monkeypatch, cfg(f"a={ARCH}@{setup / 'a.pth'}", 0))
    b = _record(monkeypatch, cfg(f"b={ARCH}@{setup / 'b.pth'}", 0))
    b_drop = _record(monkeypatch, cfg(f"b={ARCH}@{setup / 'b.pth'}", 0, drop=1))   # claim C6's ablated model
    a_seed1 = _record(monkeypatch, cfg(f"a={ARCH}@{setup / 'a.pth'}", 1))
    assert a["backbone"] != b["backbone"]                                           # the backbones differ ...
    assert len(a["batches"]) == 3 and a["batches"] == b["batches"] == b_drop["batches"]   # ... their data does not
    assert a["head"] == b["head"] == b_drop["head"]
    assert a_seed1["batches"] != a["batches"] and a_seed1["head"] != a["head"]    # and the seed does matter
