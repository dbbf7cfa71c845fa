"""Process-group setup from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), or SLURM's
for tasks started by `srun` (`slurm_environment`).

The same command runs as one plain process or under ``torchrun --nproc_per_node N`` (any number of nodes):
with WORLD_SIZE > 1 a process group is created (nccl on CUDA, gloo on CPU) and torn down at the end.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.distributed as dist

from mimlab.errors import ConfigError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    owns_group: bool = False  # True when this module created the process group (and must destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda:LOCAL_RANK if CUDA is available, else cpu; 'cuda' -> cuda:LOCAL_RANK; else as given."""
    if device in ("auto", "", None):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{local_rank}"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", f"{device}: CUDA is not available on this machine")
    return dev


def slurm_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """torchrun's variables from SLURM's, for a task launched by `srun` (none when torchrun's are set, or outside an
    srun step: an sbatch script itself is one process even when the job has several tasks).

    RANK = SLURM_PROCID, WORLD_SIZE = SLURM_STEP_NUM_TASKS, LOCAL_RANK = SLURM_LOCALID; MASTER_ADDR (unless set):
    127.0.0.1 for a one-node step, else the first host of SLURM_STEP_NODELIST (`scontrol show hostnames`); MASTER_PORT
    (unless set): 20000 + (job id x 7 + step id) mod 20000, the same in every task of the step."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env or "SLURM_PROCID" not in env or "SLURM_STEP_NUM_TASKS" not in env:
        return {}
    world = int(env["SLURM_STEP_NUM_TASKS"])
    if world <= 1:
        return {}
    out = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": str(world), "LOCAL_RANK": env.get("SLURM_LOCALID", "0")}
    if "MASTER_ADDR" not in env:
        if int(env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_NNODES", "1"))) <= 1:
            out["MASTER_ADDR"] = "127.0.0.1"
        else:
            import subprocess

            nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
            try:
                hosts = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                                       check=True, timeout=30).stdout.split()
            except (OSError, subprocess.SubprocessError):
                hosts = []
            if not hosts:
                raise ConfigError("MASTER_ADDR", f"is not set and the first host of {nodes!r} could not be read "
                                                 "with `scontrol show hostnames`: export MASTER_ADDR=<rank 0's host>")
            out["MASTER_ADDR"] = hosts[0]
    if "MASTER_PORT" not in env:
        job, step = int(env.get("SLURM_JOB_ID", "0")), int(env.get("SLURM_STEP_ID", "0") or 0)
        out["MASTER_PORT"] = str(20000 + (job * 7 + step) % 20000)
    return out


def launch_rank(env: Mapping[str, str] | None = None) -> int:
    """This process's rank as its launcher set it (torchrun's RANK, or srun's SLURM_PROCID in a step of several
    tasks), readable before any process group exists: 0 for a plain process."""
    env = os.environ if env is None else env
    if "RANK" in env:
        return int(env["RANK"])
    if "WORLD_SIZE" not in env and int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1:
        return int(env.get("SLURM_PROCID", "0") or 0)
    return 0


def setup_distributed(device: str = "auto") -> DistInfo:
    """Read torchrun's variables (or SLURM's, see `slurm_environment`) and initialise the process group if needed;
    pins the CUDA device."""
    os.environ.update(slurm_environment())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world <= 1:
        return DistInfo(0, 1, 0, dev, None, False)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"backend": backend}
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
        owns = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, dev, dist.get_backend(), owns)


def teardown_distributed(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        try:
            barrier(info)         # no rank tears gloo down while another still talks to it (an abort at exit)
        except Exception:         # a rank already gone: tear down anyway (the error that ended the run matters)
            pass
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        if info.device.type == "cuda":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean over ranks (in place on a copy); identity without a process group."""
    if not info.distributed:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / info.world_size


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
