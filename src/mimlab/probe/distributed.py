"""The probe over several processes (`torchrun --nproc_per_node N -m mimlab probe ...`, or `srun`).

The images are cut into the same consecutive batches of `batch_size` as in one process, and batch `b` goes to rank
`b mod N`: no image is seen twice or missed, and every CKA minibatch is the same set of images as in one process.
Every rank draws the bootstrap weights of every batch in order (and uses its own), so each image gets the weights it
gets in one process. After the pass, every streaming sum (per-head statistics and their bootstrap sums, token
norms, CKA's per-batch HSIC terms) is summed over ranks in float64, so the result equals one process's up to the
order of float64 additions. The first images' attention maps are gathered from the ranks that saw them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist

from mimlab.engine.dist import DistInfo
from mimlab.errors import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    """The global batches of a run (sizes and first image index) and the ones this rank probes."""
    sizes: tuple[int, ...]
    offsets: tuple[int, ...]
    mine: tuple[int, ...]

    @classmethod
    def make(cls, num_images: int, batch_size: int, rank: int = 0, world: int = 1) -> "BatchPlan":
        sizes = tuple(min(batch_size, num_images - i) for i in range(0, num_images, batch_size))
        if world > len(sizes):
            raise ConfigError("batch_size", f"{batch_size} cuts {num_images} images into {len(sizes)} batch(es), "
                                            f"fewer than the {world} processes: use smaller batches or fewer "
                                            "processes")
        offsets = tuple(sum(sizes[:i]) for i in range(len(sizes)))
        return cls(sizes, offsets, tuple(range(rank, len(sizes), world)))

    def indices(self) -> list[list[int]]:
        """This rank's batches as image indices (a DataLoader `batch_sampler`)."""
        return [list(range(self.offsets[b], self.offsets[b] + self.sizes[b])) for b in self.mine]


def _sum(tensors: list[torch.Tensor], info: DistInfo) -> list[torch.Tensor]:
    """Sum float64 tensors over ranks, in one all_reduce."""
    if not tensors:
        return []
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
    if info.backend == "nccl":
        flat = flat.to(info.device)
    tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
    flat = flat.cpu()
    out, i = [], 0
    for t in tensors:
        out.append(flat[i:i + t.numel()].reshape(t.shape))
        i += t.numel()
    return out


def _gather(obj: Any, info: DistInfo) -> list[Any]:
    box: list[Any] = [None] * info.world_size
    tdist.all_gather_object(box, obj)
    return box


def reduce_probes(probes: list, cka_acc, info: DistInfo) -> None:
    """Sum every rank's accumulators in place, so each rank holds the totals of the whole run."""
    # shapes of the lazily created per-layer accumulators: every rank has run at least one batch (BatchPlan)
    state: list[torch.Tensor] = []
    for p in probes:
        for acc in p.means:
            state += [acc.sum, torch.tensor([float(acc.count)], dtype=torch.float64)]
            if acc.bootstrap > 0:
                state += [acc.boot_sum, acc.boot_count]
        for tn in p.norms:
            state += [torch.tensor([float(tn.n), tn.median, tn.max, tn.count], dtype=torch.float64), tn.map, tn.prefix]
    if cka_acc is not None:
        state += [cka_acc.hsic, torch.tensor([float(cka_acc.num_batches), float(cka_acc.num_samples),
                                              float(cka_acc.skipped_samples)], dtype=torch.float64)]
    total = iter(_sum(state, info))
    for p in probes:
        for acc in p.means:
            acc.sum, acc.count = next(total), int(next(total)[0])
            if acc.bootstrap > 0:
                acc.boot_sum, acc.boot_count = next(total), next(total)
        for tn in p.norms:
            head = next(total)
            tn.n, tn.median, tn.max, tn.count = int(head[0]), float(head[1]), float(head[2]), float(head[3])
            tn.map, tn.prefix = next(total), next(total)
    if cka_acc is not None:
        cka_acc.hsic = next(total)
        counts = next(total)
        cka_acc.num_batches, cka_acc.num_samples, cka_acc.skipped_samples = (int(v) for v in counts)
    # the rest: worst row-sum error, the kernels used, and the maps of the first images
    extras = _gather([(p.max_rowsum_err, sorted(p.backend.used), p.maps.parts() if p.maps is not None else None)
                      for p in probes], info)
    for i, p in enumerate(probes):
        p.max_rowsum_err = max(r[i][0] for r in extras)
        p.backend.used.update(k for r in extras for k in r[i][1])
        if p.maps is not None:
            p.maps.merge([r[i][2] for r in extras])
