"""A step-indexed, resumable, DDP-aware batch sampler and per-sample seeds.

The data order is a pure function of ``(seed, epoch)``: epoch ``e`` visits ``randperm(N)`` drawn from a generator
seeded with ``mix_seed(seed, e)``, cut into ``N // global_batch`` global batches (the remainder is dropped).
Optimizer step ``s`` reads global batch ``s mod batches_per_epoch`` of epoch ``s // batches_per_epoch``, so the
data position is the step count: resuming at step ``s`` needs no other state.

A global batch is laid out as ``accum_steps`` micro-steps of ``world_size`` slices; rank ``r`` reads slice ``r``
of each micro-step. One process and N processes therefore see the same images in every optimizer step.

Augmentation randomness: datasets that subclass `SeededDataset` receive ``SampleKey(index, seed)`` with
``seed = mix_seed(run_seed, epoch, index)``, so every random crop/flip/mask is a pure function of the run
seed, the epoch and the image, independent of worker count, process count and of resuming.
"""
from __future__ import annotations

from typing import Any, Iterator, NamedTuple

import torch
from torch.utils.data import Dataset

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One step of splitmix64 (Steele, Lea & Flood 2014), a well-mixed 64-bit bijection."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = x
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def mix_seed(*values: int) -> int:
    """Hash a sequence of integers into a seed in [0, 2**63) (order matters)."""
    h = 0x6A09E667F3BCC908
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h >> 1


class SampleKey(NamedTuple):
    """What a `SeededDataset` receives from the sampler: the sample index and its augmentation seed."""

    index: int
    seed: int


class SeededDataset(Dataset):
    """A dataset whose random augmentation depends only on a per-sample seed (see module docstring).

    Subclasses implement ``__len__`` and ``get(index, seed)``. Indexing with a plain int uses seed
    ``mix_seed(index)``, so the dataset also works with an ordinary sampler.
    """

    def get(self, index: int, seed: int) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, tuple):
            return self.get(int(key[0]), int(key[1]))
        return self.get(int(key), mix_seed(int(key)))


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The visiting order of epoch `epoch`: a permutation of range(num_samples) from (seed, epoch) only."""
    if not shuffle:
        return torch.arange(num_samples)
    g = torch.Generator().manual_seed(mix_seed(seed, epoch))
    return torch.randperm(num_samples, generator=g)


class StepBatchSampler:
    """Yields this rank's micro-batches for optimizer steps ``start_step .. total_steps - 1``.

    Each yielded batch is a list of `SampleKey` (``seeded=True``) or of ints. The micro-batch per rank is
    ``global_batch / (world_size * accum_steps)``, which must be an integer.
    """

    def __init__(self, num_samples: int, global_batch: int, *, total_steps: int, seed: int = 0,
                 start_step: int = 0, rank: int = 0, world_size: int = 1, accum_steps: int = 1,
                 shuffle: bool = True, seeded: bool = True):
        if global_batch % (world_size * accum_steps):
            raise ValueError(f"global batch {global_batch} is not divisible by world_size {world_size} x "
                             f"accum_steps {accum_steps}")
        if num_samples < global_batch:
            raise ValueError(f"{num_samples} samples are fewer than one global batch of {global_batch}")
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.total_steps = total_steps
        self.seed = seed
        self.start_step = start_step
        self.rank = rank
        self.world_size = world_size
        self.accum_steps = accum_steps
        self.shuffle = shuffle
        self.seeded = seeded
        self.micro_batch = global_batch // (world_size * accum_steps)
        self.batches_per_epoch = num_samples // global_batch

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch index within the epoch) read by optimizer step `step`."""
        return divmod(step, self.batches_per_epoch)

    def global_batch_indices(self, step: int) -> list[int]:
        """All sample indices of optimizer step `step`, in global-batch order (every rank, every micro-step)."""
        epoch, b = self.position(step)
        order = epoch_order(self.num_samples, self.seed, epoch, self.shuffle)
        return order[b * self.global_batch:(b + 1) * self.global_batch].tolist()

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step) * self.accum_steps

    def __iter__(self) -> Iterator[list]:
        cached_epoch, order = -1, None
        m, w = self.micro_batch, self.world_size
        for step in range(self.start_step, self.total_steps):
            epoch, b = self.position(step)
            if epoch != cached_epoch:
                order = epoch_order(self.num_samples, self.seed, epoch, self.shuffle).tolist()
                cached_epoch = epoch
            chunk = order[b * self.global_batch:(b + 1) * self.global_batch]
            for a in range(self.accum_steps):
                start = a * w * m + self.rank * m
                idx = chunk[start:start + m]
                if self.seeded:
                    yield [SampleKey(i, mix_seed(self.seed, epoch, i)) for i in idx]
                else:
                    yield idx
