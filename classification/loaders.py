"""Training loaders whose epoch a run resumed mid-way continues: shared by CIFAR, Places365 and ImageNet.

Lightning checkpoints a train DataLoader's position when the loader has `state_dict` / `load_state_dict`.
Without them, a run resumed from a step checkpoint (the Places365-Challenge and ImageNet configs write one)
restarts the epoch's loader: it runs the remaining number of steps, but over the epoch's first samples, so
some of the epoch's samples are seen twice and others never.
"""

from __future__ import annotations

from itertools import islice
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler


class EpochRandomSampler(RandomSampler):
    """Random order that depends only on (seed, epoch): Lightning calls `set_epoch`, so a resumed run
    replays the same order. Under DDP Lightning swaps it for a DistributedSampler (also seeded by epoch)."""

    def __init__(self, data_source: Dataset, seed: int = 0):
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


class ResumableDataLoader(DataLoader):
    """A DataLoader whose place in the epoch is checkpointed (Lightning's `_Stateful` protocol).

    `state_dict()` is {"epoch": the sampler's epoch, "batches": batches yielded in it}. After
    `load_state_dict()`, the next pass, if it is of that same epoch, leaves out those batches' indices (their
    images are never loaded) and yields the rest. That is the uninterrupted run's remainder when the
    sampler's order is a function of (seed, epoch): EpochRandomSampler, Lightning's DistributedSampler under
    DDP, or no shuffling. A checkpoint from an epoch's end resumes in the next epoch, which skips nothing.
    """

    # class defaults: Lightning re-creates the loader from its constructor arguments (DDP sampler swap)
    _yielded = 0  # batches yielded by the current pass
    _epoch: int | None = None  # the sampler's epoch in the current pass
    _skip = 0  # batches the current pass leaves out
    _resume: tuple[int | None, int] | None = None  # (epoch, batches) from a checkpoint, for the next pass

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "batches": self._yielded}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = (state_dict["epoch"], state_dict["batches"])

    def __iter__(self):
        return self._pass()

    def _pass(self):
        # Starts at the first batch, not here: Lightning creates a resumed run's iterator before it calls
        # set_epoch, and worker processes draw the sampler's order as soon as the iterator exists.
        epoch = getattr(self.sampler, "epoch", None)
        resume, self._resume = self._resume, None
        self._skip = resume[1] if resume is not None and resume[0] == epoch else 0
        self._epoch, self._yielded = epoch, self._skip
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    @property
    def _index_sampler(self):
        return _SkipBatches(super()._index_sampler, self)


class _SkipBatches:
    """A batch sampler without the first `loader._skip` batches; its length stays that of the whole epoch."""

    def __init__(self, batches, loader: ResumableDataLoader):
        self.batches, self.loader = batches, loader

    def __iter__(self):
        return islice(self.batches, self.loader._skip, None)

    def __len__(self) -> int:
        return len(self.batches)
