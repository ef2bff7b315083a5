"""The Trainer's data order: a seeded shuffle per epoch that a resumed run continues exactly."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["ResumableSampler"]


class ResumableSampler(Sampler[int]):
    """A seeded shuffle per epoch that can start part-way through an epoch.

    Epoch ``e`` is ``randperm(n)`` from a generator seeded with (seed, e);
    ``skip`` leading indices are dropped (the samples already trained on) and
    the rest is cut to whole global batches, so every process gets full,
    equal batches and the order is the same however often the run resumes.
    """

    def __init__(self, num_samples: int, global_batch: int, seed: int = 0):
        self.num_samples, self.global_batch, self.seed = num_samples, global_batch, seed
        self.epoch, self.skip = 0, 0

    def position(self, epoch: int, skip: int) -> None:
        """Start the next iteration at sample ``skip`` of epoch ``epoch``."""
        self.epoch, self.skip = int(epoch), int(skip)

    def _count(self) -> int:
        """Samples left in this epoch, cut to whole global batches."""
        return max(0, (self.num_samples - self.skip) // self.global_batch * self.global_batch)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % (2 ** 63))
        order = torch.randperm(self.num_samples, generator=g)
        return iter(order[self.skip:self.skip + self._count()].tolist())

    def __len__(self) -> int:
        return self._count()
