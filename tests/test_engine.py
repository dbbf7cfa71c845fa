"""The shared training engine: schedule, no-decay set, sampler, exact resume, NaN stop, out-dir guard, DDP."""
from __future__ import annotations

import csv
import math
import os
import socket
from pathlib import Path

import pytest
import torch
from torch import nn

from mimlab.engine import (Callback, SeededDataset, StepBatchSampler, TrainConfig, epoch_order, lr_at, mix_seed,
                           param_groups_weight_decay, seed_everything, train)
from mimlab.engine.loop import NonFiniteLossError
from mimlab.engine.state import load_checkpoint
from mimlab.errors import MimlabError


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------- tiny task
class Regression(SeededDataset):
    """y = x . w with a little seeded input noise (the 'augmentation')."""

    def __init__(self, n: int = 48, dim: int = 6):
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x @ torch.linspace(-1, 1, dim)[:, None]

    def __len__(self) -> int:
        return len(self.x)

    def get(self, index: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        return {"x": self.x[index] + 0.05 * torch.randn(self.x.shape[1], generator=g), "y": self.y[index]}


def make_model(dropout: float = 0.2) -> nn.Module:
    seed_everything(0)
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Dropout(dropout), nn.Linear(16, 1))


def mse(net, batch):
    loss = ((net(batch["x"]) - batch["y"]) ** 2).mean()
    return loss, {"rmse": loss.detach().sqrt()}


def cfg_for(out, **kw) -> TrainConfig:
    base = dict(out_dir=out, steps=9, batch_size=8, lr=3e-2, warmup_steps=2, clip_grad=5.0, tensorboard=False,
                progress=False, log_every=2, device="cpu", deterministic=True)
    base.update(kw)
    return TrainConfig(**base)


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------- pure pieces
def test_lr_schedule_values():
    kw = dict(base_lr=1.0, total_steps=10, warmup_steps=4, warmup_lr=0.0)
    assert [lr_at(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    # cosine: t = (s - 4) / 6
    assert lr_at(4, **kw) == pytest.approx(1.0)
    assert lr_at(7, **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(9, **kw, min_lr=0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 6)))
    # step: SimMIM ViT-B's x0.1 at 7/8 of the run (a fraction) or at a step number
    step = dict(base_lr=2.0, total_steps=800, schedule="step", milestones=(0.875,))
    assert lr_at(699, **step) == 2.0 and lr_at(700, **step) == pytest.approx(0.2)
    assert lr_at(5, base_lr=1.0, total_steps=10, schedule="step", milestones=(3, 5), gamma=0.5) == 0.25
    assert lr_at(3, base_lr=1.0, total_steps=10, schedule="constant") == 1.0
    with pytest.raises(MimlabError, match="schedule"):
        lr_at(0, base_lr=1.0, total_steps=10, schedule="linear")


def test_no_weight_decay_set_on_a_vit():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                            embed_dim=32, num_heads=2, num_classes=0)
    groups = param_groups_weight_decay(vit, 0.05)
    ids = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(vit.named_parameters())
    no_decay = {n for n, p in named.items() if ids[id(p)] == 0.0}
    decay = {n for n, p in named.items() if ids[id(p)] == 0.05}
    assert {"pos_embed", "cls_token", "blocks.0.attn.qkv.bias", "blocks.0.norm1.weight", "norm.weight",
            "patch_embed.proj.bias"} <= no_decay
    assert decay == {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
                     "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight"}


def test_mix_seed_is_deterministic_and_order_sensitive():
    assert mix_seed(1, 2, 3) == mix_seed(1, 2, 3)
    assert len({mix_seed(0, e, i) for e in range(20) for i in range(50)}) == 1000
    assert mix_seed(1, 2) != mix_seed(2, 1)
    assert 0 <= mix_seed(2 ** 70, -5) < 2 ** 63


def test_sampler_order_layout_and_resume_position():
    n, gb = 50, 12  # 4 global batches per epoch, 2 images dropped
    full = StepBatchSampler(n, gb, total_steps=10, seed=7, seeded=False)
    steps = list(full)
    assert len(steps) == 10 and all(len(b) == gb for b in steps)
    # epoch e is a prefix of randperm from (seed, e) only
    perm1 = epoch_order(n, 7, 1).tolist()
    assert steps[5] == perm1[12:24]
    assert sorted(sum(steps[:4], [])) == sorted(epoch_order(n, 7, 0).tolist()[:48])
    # two ranks x two accumulation micro-steps: the union of the 4 micro-batches is the global batch, in order
    parts = [list(StepBatchSampler(n, gb, total_steps=10, seed=7, rank=r, world_size=2, accum_steps=2,
                                   seeded=False)) for r in range(2)]
    for s in range(10):
        r0a, r0b = parts[0][2 * s], parts[0][2 * s + 1]
        r1a, r1b = parts[1][2 * s], parts[1][2 * s + 1]
        assert r0a + r1a + r0b + r1b == steps[s]
    # resuming at step 6 yields exactly the tail
    assert list(StepBatchSampler(n, gb, total_steps=10, seed=7, start_step=6, seeded=False)) == steps[6:]
    keyed = list(StepBatchSampler(n, gb, total_steps=2, seed=7))
    assert keyed[1][0].index == steps[1][0] and keyed[1][0].seed == mix_seed(7, 0, steps[1][0])


# ----------------------------------------------------------------------------------------- runs
def test_training_lowers_the_loss_and_logs_every_step(tmp_path):
    model = make_model(dropout=0.0)
    res = train(model, mse, Regression(), cfg_for(tmp_path / "run", steps=40, lr=5e-2))
    assert res.step == 40 and len(res.losses) == 40
    assert sum(res.losses[-5:]) / 5 < 0.3 * sum(res.losses[:5]) / 5
    rows = read_csv(tmp_path / "run" / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 41))
    assert float(rows[0]["lr"]) == pytest.approx(5e-2 / 2)  # warmup step 1 of 2
    assert float(rows[3]["rmse"]) == pytest.approx(math.sqrt(float(rows[3]["loss"])), rel=1e-5)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["step"] == 40 and state["data"]["batches_per_epoch"] == 6
    assert all(torch.equal(a, b) for a, b in zip(state["model"].values(), model.state_dict().values()))


def test_kill_and_resume_is_bitwise_exact(tmp_path):
    ref = make_model()
    train(ref, mse, Regression(), cfg_for(tmp_path / "ref"))

    # crash after step 7 with the last checkpoint at step 6: steps 7 is lost and redone
    crashed = make_model()
    res = train(crashed, mse, Regression(), cfg_for(tmp_path / "run", save_every=3, stop_after=7))
    assert res.stopped_early and res.step == 7
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 6

    resumed = make_model()
    torch.manual_seed(999)  # whatever happens to the RNG before resuming must not matter
    res2 = train(resumed, mse, Regression(), cfg_for(tmp_path / "run", save_every=3, resume=True))
    assert res2.start_step == 6 and res2.step == 9
    assert all(torch.equal(a, b) for a, b in zip(params_of(ref), params_of(resumed)))
    ref_rows, rows = read_csv(tmp_path / "ref" / "metrics.csv"), read_csv(tmp_path / "run" / "metrics.csv")
    assert [r["step"] for r in rows] == [str(s) for s in range(1, 10)]  # no duplicate step 7
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]


def test_resumed_at_its_last_step_reports_the_same_final_loss(tmp_path):
    """Killed after its final checkpoint but before it could report (a study stage killed there): rerun with
    resume, no step runs, and the final loss is the finished run's, not None (found by the crash test: the
    study's loss gate then skipped its check and the summary differed)."""
    first = train(make_model(), mse, Regression(), cfg_for(tmp_path / "run"))
    again = train(make_model(), mse, Regression(), cfg_for(tmp_path / "run", resume=True))
    assert again.start_step == again.step == 9 and again.losses == []
    assert first.final_loss is not None and again.final_loss == first.final_loss
    resumed_twice = train(make_model(), mse, Regression(), cfg_for(tmp_path / "run", resume=True))
    assert resumed_twice.final_loss == first.final_loss


def test_checkpoint_is_plain_data_and_rng_states_round_trip(tmp_path):
    """Format 2: loads with torch.load(weights_only=True); RNG states (python, numpy, torch) restore exactly;
    numpy values in the run identity are stored as plain numbers and still match on resume."""
    import random

    import numpy as np

    from mimlab.engine import capture_rng, restore_rng

    ident = {"method": "a", "ratio": np.float64(0.75), "cells": np.int64(10), "path": tmp_path}
    train(make_model(), mse, Regression(), cfg_for(tmp_path / "run", steps=2, identity=ident))
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert state["identity"]["ratio"] == 0.75 and type(state["identity"]["ratio"]) is float
    assert state["identity"]["path"] == str(tmp_path)
    rng = state["rng"][0]
    assert rng["numpy"]["keys"].dtype == torch.int64 and rng["python"]["state"].dtype == torch.int64
    res = train(make_model(), mse, Regression(), cfg_for(tmp_path / "run", steps=3, resume=True, identity=ident))
    assert (res.start_step, res.step) == (2, 3)

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()                     # leaves a cached gaussian in numpy's legacy state
    saved = capture_rng()
    torch.save(saved, tmp_path / "rng.pt")
    first = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == first


def test_grad_accumulation_matches_the_full_batch(tmp_path):
    a, b = make_model(dropout=0.0), make_model(dropout=0.0)
    train(a, mse, Regression(), cfg_for(tmp_path / "a", steps=4))
    train(b, mse, Regression(), cfg_for(tmp_path / "b", steps=4, accum_steps=4))
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_callbacks_do_not_change_the_trajectory(tmp_path):
    seen = []

    def noisy(ctx):
        torch.randn(100)  # consumes the global RNG: must be isolated
        assert not ctx.model.training
        seen.append(ctx.step)
        return {"w_norm": float(sum(p.norm() for p in ctx.model.parameters()))}

    a, b = make_model(), make_model()
    train(a, mse, Regression(), cfg_for(tmp_path / "a"))
    train(b, mse, Regression(), cfg_for(tmp_path / "b"), callbacks=[Callback("watch", every=4, fn=noisy,
                                                                              at_start=True)])
    assert seen == [0, 4, 8, 9]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert [r["step"] for r in read_csv(tmp_path / "b" / "watch.csv")] == ["0", "4", "8", "9"]


def test_caller_param_groups_with_lr_scale(tmp_path):
    """Layer-wise lr decay style groups: lr = schedule * lr_scale; a group at scale 0 never moves."""
    model = make_model(dropout=0.0)
    first, last = model[0], model[3]
    before = params_of(first)
    groups = [{"params": list(first.parameters()), "lr_scale": 0.0, "weight_decay": 0.0},
              {"params": list(last.parameters()), "lr_scale": 1.0}]
    train(model, mse, Regression(), cfg_for(tmp_path / "run", steps=3), param_groups=groups)
    assert all(torch.equal(a, b) for a, b in zip(before, first.parameters()))
    assert not torch.equal(make_model(dropout=0.0)[3].weight, last.weight)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    def exploding(net, batch):
        loss, logs = mse(net, batch)
        exploding.calls += 1
        return (loss * float("nan") if exploding.calls >= 5 else loss), logs

    exploding.calls = 0
    model = make_model()
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at step 5.*step 4\) is intact"):
        train(model, exploding, Regression(), cfg_for(tmp_path / "run", save_every=2))
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_out_dir_guard_and_identity(tmp_path):
    out = tmp_path / "run"
    train(make_model(), mse, Regression(), cfg_for(out, steps=2, identity={"method": "a"}))
    with pytest.raises(MimlabError, match="out_dir .* already holds a run's checkpoint.*resume=True.*overwrite=True"):
        train(make_model(), mse, Regression(), cfg_for(out, steps=2))
    with pytest.raises(MimlabError, match="different run.*method"):
        train(make_model(), mse, Regression(), cfg_for(out, steps=3, resume=True, identity={"method": "b"}))
    res = train(make_model(), mse, Regression(), cfg_for(out, steps=3, overwrite=True, identity={"method": "b"}))
    assert res.start_step == 0 and res.step == 3
    (out / "keep.txt").write_text("not ours")
    train(make_model(), mse, Regression(), cfg_for(out, steps=2, overwrite=True))
    assert (out / "keep.txt").exists()  # --overwrite deletes only the run's own outputs
    # extending a finished run: resume continues from its last step
    res = train(make_model(), mse, Regression(), cfg_for(out, steps=4, resume=True))
    assert (res.start_step, res.step) == (2, 4)


def test_dataset_smaller_than_batch_and_bad_batch_split(tmp_path):
    with pytest.raises(MimlabError, match="batch_size 64: the dataset has 48 samples, fewer than one batch"):
        train(make_model(), mse, Regression(), cfg_for(tmp_path / "a", batch_size=64))
    with pytest.raises(MimlabError, match="divisible"):
        train(make_model(), mse, Regression(), cfg_for(tmp_path / "b", batch_size=8, accum_steps=3))


# ----------------------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    model = make_model(dropout=0.0)
    train(model, mse, Regression(), cfg_for(out, steps=5, accum_steps=1))


@pytest.mark.slow
def test_two_process_gloo_ddp_matches_one_process(tmp_path):
    import torch.multiprocessing as mp

    one = make_model(dropout=0.0)
    train(one, mse, Regression(), cfg_for(tmp_path / "one", steps=5))
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path / "two")), nprocs=2, join=True,
                       start_method="spawn")
    two = load_checkpoint(tmp_path / "two" / "checkpoints" / "last.pt")
    assert two["step"] == 5 and len(two["rng"]) == 2
    init = make_model(dropout=0.0).state_dict()
    for k, v in one.state_dict().items():
        assert (v - init[k]).abs().max() > 1e-2                     # the runs moved far from the init ...
        torch.testing.assert_close(two["model"][k], v, rtol=1e-4, atol=1e-5)  # ... and agree (reduction order)
    losses1 = [float(r["loss"]) for r in read_csv(tmp_path / "one" / "metrics.csv")]
    losses2 = [float(r["loss"]) for r in read_csv(tmp_path / "two" / "metrics.csv")]
    assert losses2 == pytest.approx(losses1, rel=1e-5)
