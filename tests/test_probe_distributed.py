"""The probe over several processes equals one process on the same images (relative 1e-9): every per-head
statistic, its bootstrap interval, token norms, CKA and the attention maps. Launched as users launch it: `torchrun
--nproc_per_node N -m mimlab probe ...` (gloo, CPU), and as `srun` would, with SLURM's variables only."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from mimlab.engine.dist import launch_rank, slurm_environment
from mimlab.errors import ConfigError
from mimlab.probe.distributed import BatchPlan

KW = "img_size=32,patch_size=4,depth=2,embed_dim=32,num_heads=2,reg_tokens=2"
RTOL = 1e-9


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=4, depth=2, embed_dim=32, num_heads=2, reg_tokens=2, num_classes=0)
    ckpts = []
    for name in ("a", "b"):
        m = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n.endswith("qkv.weight"):
                    p.mul_(3.0)
        torch.save(m.state_dict(), root / f"{name}.pth")
        ckpts.append(f"{name}=vit_tiny_patch16_224@{root / f'{name}.pth'}")
    # 18 images in batches of 4: 4, 4, 4, 4, 2 (the last is left out of CKA; uneven shares across ranks)
    argv = ["probe", *ckpts, "--model-kwargs", KW, "--data", "builtin", "--images", "18", "--batch-size", "4",
            "--bootstrap", "50", "--maps", "6", "--workers", "0", "--quiet", "--no-report"]
    single = root / "single"
    _run([sys.executable, "-m", "mimlab", *argv, "--out", str(single)], {})
    return root, argv, json.loads((single / "metrics.json").read_text()), np.load(single / "maps.npz")


def _run(cmd: list[str], env: dict[str, str]) -> None:
    full = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    full.update(env, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _compare(got, want, path=""):
    """Every number equal to RTOL, every other value identical; timings and process facts aside."""
    if isinstance(want, dict):
        for k in want:
            if k in ("seconds", "images_per_second", "provenance", "timestamp", "config"):
                continue
            assert k in got, f"{path}/{k} missing"
            _compare(got[k], want[k], f"{path}/{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            _compare(g, w, f"{path}[{i}]")
    elif isinstance(want, float):
        assert abs(got - want) <= RTOL * max(abs(want), 1e-12), (path, got, want)
    else:
        assert got == want, (path, got, want)


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 3])
def test_torchrun_equals_one_process(setup, nproc):
    root, argv, want, want_maps = setup
    out = root / f"torchrun{nproc}"
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
          str(_free_port()), "-m", "mimlab", *argv, "--out", str(out)], {})
    got = json.loads((out / "metrics.json").read_text())
    assert got["provenance"]["processes"] == {"world_size": nproc, "backend": "gloo", "batches": "round-robin"}
    assert got["num_images"] == 18 and got["cka_config"]["num_batches"] == 4
    assert got["cka_config"]["images_left_out"] == 2
    _compare(got, want)
    maps = np.load(out / "maps.npz")
    for k in want_maps.files:
        np.testing.assert_allclose(maps[k], want_maps[k], rtol=1e-6, atol=1e-8)   # float32 arrays
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (root / "single").iterdir())


@pytest.mark.slow
def test_srun_variables_alone_start_the_process_group(setup):
    """Two tasks with SLURM's variables and none of torchrun's, as `srun --ntasks 2` starts them."""
    root, argv, want, _ = setup
    out = root / "srun"
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")}
        env.update(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_STEP_NUM_TASKS="2",
                   SLURM_STEP_NUM_NODES="1", SLURM_JOB_ID="4242", MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-m", "mimlab", *argv, "--out", str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    got = json.loads((out / "metrics.json").read_text())
    assert got["provenance"]["processes"]["world_size"] == 2
    _compare(got, want)


def test_batch_plan_covers_every_image_once():
    for n, bs, world in [(18, 4, 2), (18, 4, 3), (17, 5, 4), (8, 8, 1)]:
        plans = [BatchPlan.make(n, bs, r, world) for r in range(world)]
        images = sorted(i for p in plans for batch in p.indices() for i in batch)
        assert images == list(range(n))
        assert plans[0].sizes == tuple(min(bs, n - i) for i in range(0, n, bs))   # one process's batches
    with pytest.raises(ConfigError, match="batch_size 8 cuts 10 images into 2 batch.*fewer than the 3 processes"):
        BatchPlan.make(10, 8, 0, 3)


def test_launch_rank_before_any_process_group():
    """The rank that holds the --out lock is known before the process group exists: torchrun's RANK, or srun's
    SLURM_PROCID in a step of several tasks (as `slurm_environment` maps it), else 0."""
    assert launch_rank({}) == 0 and launch_rank({"RANK": "2", "WORLD_SIZE": "4"}) == 2
    step = {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4"}
    assert launch_rank(step) == 3 == int(slurm_environment({**step, "MASTER_ADDR": "h", "MASTER_PORT": "1"})["RANK"])
    assert launch_rank({"SLURM_PROCID": "3", "SLURM_NTASKS": "4"}) == 0        # the sbatch script itself
    assert launch_rank({**step, "WORLD_SIZE": "4", "RANK": "1"}) == 1           # torchrun's variables win


def test_slurm_environment_mapping():
    base = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NUM_NODES": "1",
            "SLURM_JOB_ID": "100", "SLURM_STEP_ID": "2"}
    assert slurm_environment(base) == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(20000 + 702)}
    assert slurm_environment({**base, "WORLD_SIZE": "4"}) == {}            # torchrun's variables win
    assert slurm_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}) == {}   # the sbatch script itself
    assert slurm_environment({**base, "MASTER_ADDR": "n1", "MASTER_PORT": "1"}) == \
        {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}
    with pytest.raises(ConfigError, match="MASTER_ADDR is not set"):
        slurm_environment({**base, "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NODELIST": "n[1-2]",
                           "PATH": "/nonexistent"})
