"""Which samples each micro-batch gets: seeded per-epoch shuffles, sharded across processes.

The position in the data is a single micro-batch counter, so a resumed run continues exactly
where the interrupted one stopped, mid-epoch included.
"""

from __future__ import annotations

import math
from typing import Generic, TypeVar

import torch

T = TypeVar("T")


class DataOrder(Generic[T]):
    def __init__(
        self, samples: list[T], *, batch_size: int, seed: int, rank: int, world: int
    ) -> None:
        self.samples = samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world = world
        self.micro_per_epoch = math.ceil(math.ceil(len(samples) / world) / batch_size)

    def micro_batch(self, position: int) -> tuple[int, list[T]]:
        """(epoch, samples) of the micro-batch at `position` counted from the start of training."""
        epoch, offset = divmod(position, self.micro_per_epoch)
        shuffle = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.samples), generator=shuffle)[self.rank :: self.world]
        chosen = order[offset * self.batch_size : (offset + 1) * self.batch_size].tolist()
        return epoch, [self.samples[i] for i in chosen]
