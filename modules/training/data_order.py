"""Which samples each micro-batch gets: seeded per-epoch plans of one-bucket batches, sharded.

The position in the data is a single micro-batch counter and every plan is a pure function of
(seed, epoch), so a resumed run continues exactly where the interrupted one stopped, mid-epoch
included, with no extra state in the backup.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Group:
    """Samples of one concept in one bucket, and how many of them an epoch draws."""

    bucket: Hashable
    members: tuple[int, ...]  # sample indices
    per_epoch: int  # repeats applied; more than len(members) repeats some


@dataclass(frozen=True)
class Draw:
    """One sample of a micro-batch and the seed of its augmentations (crop, flip, caption)."""

    index: int
    seed: tuple[int, ...]


class DataOrder:
    """Each epoch: draw every group, shuffle within buckets, cut into batches, shuffle batches.

    No image is lost to a partial batch unless `drop_last`; with several processes the batch list
    is padded (repeating its first batches) so every rank runs the same number of micro-batches.
    """

    def __init__(
        self,
        groups: list[Group],
        *,
        batch_size: int,
        seed: int,
        rank: int,
        world: int,
        drop_last: bool = False,
    ) -> None:
        self.groups = groups
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world = world
        self.drop_last = drop_last
        self._plan: tuple[int, list[list[int]]] | None = None
        per_bucket: dict[Hashable, int] = {}
        for group in groups:
            per_bucket[group.bucket] = per_bucket.get(group.bucket, 0) + group.per_epoch
        rounding = (lambda n: n // batch_size) if drop_last else (lambda n: -(-n // batch_size))
        batches = sum(rounding(n) for n in per_bucket.values())
        self.micro_per_epoch = -(-batches // world)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All batches of `epoch` (sample indices) before sharding, padded to a multiple of world."""
        if self._plan is not None and self._plan[0] == epoch:
            return self._plan[1]
        shuffle = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        by_bucket: dict[Hashable, list[int]] = {}
        for group in self.groups:
            full, extra = divmod(group.per_epoch, len(group.members))
            chosen = list(group.members) * full
            if extra:
                picked = torch.randperm(len(group.members), generator=shuffle)[:extra]
                chosen += [group.members[i] for i in sorted(picked.tolist())]
            by_bucket.setdefault(group.bucket, []).extend(chosen)
        batches: list[list[int]] = []
        for bucket in sorted(by_bucket, key=repr):
            items = by_bucket[bucket]
            items = [items[i] for i in torch.randperm(len(items), generator=shuffle).tolist()]
            for start in range(0, len(items), self.batch_size):
                batch = items[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        batches = [batches[i] for i in torch.randperm(len(batches), generator=shuffle).tolist()]
        padded = self.micro_per_epoch * self.world
        batches += [batches[i % len(batches)] for i in range(padded - len(batches))]
        self._plan = (epoch, batches)
        return batches

    def noise_seed(self, position: int) -> int:
        """Seed of the diffusion noise and timesteps of this rank's micro-batch at `position`.

        Keyed like the augmentations by (seed, epoch, slot): every rank draws its own noise, the
        draws do not depend on the number of processes (2 ranks see what 1 process accumulating
        2 micro-batches sees), and a resumed run needs no saved generator state.
        """
        epoch, offset = divmod(position, self.micro_per_epoch)
        slot = offset * self.world + self.rank
        return (self.seed * 1_000_003 + epoch * 10_007 + slot) % (2**63)

    def micro_batch(self, position: int) -> tuple[int, list[Draw]]:
        """(epoch, draws) of this rank's micro-batch at `position` counted from the start."""
        epoch, offset = divmod(position, self.micro_per_epoch)
        slot = offset * self.world + self.rank
        batch = self.epoch_batches(epoch)[slot]
        return epoch, [Draw(index, (self.seed, epoch, slot, i)) for i, index in enumerate(batch)]
