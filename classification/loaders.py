"""The data loading every classification trainer (CIFAR, Places365, ImageNet) shares.

`ClassificationDataModule` is the base of the trainers' DataModules: the batch and worker options, and the
train / val / test loaders, all built by `build_loader`. The training loader is a `ResumableDataLoader`:
Lightning checkpoints a train DataLoader's position when the loader has `state_dict` / `load_state_dict`.
Without them, a run resumed from a step checkpoint (the Places365-Challenge and ImageNet configs write one)
restarts the epoch's loader: it runs the remaining number of steps, but over the epoch's first samples, so
some of the epoch's samples are seen twice and others never.

One seed drives everything: `seed_everything` (the CLI's `--seed_everything`) seeds the model's
initialisation, and `data_seed()` hands the same seed to the sampler and the augmentation.

Under DDP (one process per device) Lightning gives the training loader a DistributedSampler: each rank reads
its own share of the epoch (padded by repeating a few samples to an equal share), in an order of (seed, epoch)
that the resumable loader continues as on one process. The evaluation loaders get an unpadded one here, so
every validation sample is scored exactly once and the reduced error is the single-process one; each rank's
augmentation draws from its own stream (`augment_seed`, `seed_worker`).
"""

from __future__ import annotations

import os
from functools import partial
from itertools import islice
from typing import Any

import cv2
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, RandomSampler, get_worker_info


def data_seed() -> int:
    """The run's seed for the data order and the augmentation: the one `seed_everything` set.

    Lightning exports it as PL_GLOBAL_SEED (inherited by DDP processes) and seeds its own DistributedSampler
    with it under DDP; 0 when nothing was seeded, as there.
    """
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


_RANK_STRIDE = 1 << 20  # more than the worker processes of one rank: the ranks' worker seeds never meet


def augment_seed(rank: int = 0) -> int:
    """The seed of process `rank`'s augmentation stream: the run's seed on rank 0 (and on one process).

    Every DDP process is seeded alike; with one augmentation seed, all of them would draw the same crops and
    flips, each for its own images.
    """
    return data_seed() + rank * _RANK_STRIDE


def seed_worker(worker_id: int, rank: int = 0) -> None:
    """DataLoader `worker_init_fn`: a distinct augmentation stream per worker and epoch, one OpenCV thread.

    torch gives every worker of every epoch its own seed; the albumentations pipeline copied into a forked
    worker would otherwise replay the parent's random stream in every worker. The dataset's `transform` is
    reseeded through albumentations' `set_random_seed` (an `A.Compose`, or a wrapper with the same method).
    torch's worker seeds are the same on every DDP rank (each rank's generator is seeded alike): `rank` (bound by
    `build_loader`) sets them apart. OpenCV's own thread pool would oversubscribe the cores the other workers use.
    """
    cv2.setNumThreads(1)
    info = get_worker_info()
    transform = getattr(info.dataset, "transform", None)
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed((info.seed + rank * _RANK_STRIDE) % 2**32)


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
    Under DDP the state also holds "replicas", the process count: each rank skips its own share's batches, and
    the shares depend on it, so resuming mid-epoch on another count warns that the rest of that epoch is not
    the interrupted one's remainder (later epochs are whole).
    """

    # class defaults: Lightning re-creates the loader from its constructor arguments (DDP sampler swap)
    _yielded = 0  # batches yielded by the current pass
    _epoch: int | None = None  # the sampler's epoch in the current pass
    _skip = 0  # batches the current pass leaves out
    _resume: dict[str, Any] | None = None  # a checkpoint's state, for the next pass

    def state_dict(self) -> dict[str, Any]:
        replicas = getattr(self.sampler, "num_replicas", 1)
        return {"epoch": self._epoch, "batches": self._yielded, **({"replicas": replicas} if replicas > 1 else {})}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = state_dict

    def __iter__(self):
        return self._pass()

    def _pass(self):
        # Starts at the first batch, not here: Lightning creates a resumed run's iterator before it calls
        # set_epoch, and worker processes draw the sampler's order as soon as the iterator exists.
        epoch = getattr(self.sampler, "epoch", None)
        resume, self._resume = self._resume, None
        self._skip = resume["batches"] if resume is not None and resume["epoch"] == epoch else 0
        replicas = getattr(self.sampler, "num_replicas", 1)
        if self._skip and resume.get("replicas", 1) != replicas:
            rank_zero_warn(
                f"resuming mid-epoch {epoch} on {replicas} process(es) from a checkpoint of "
                f"{resume.get('replicas', 1)}: each process skips {self._skip} batches of its own share, so the "
                "rest of this epoch is not the interrupted run's (some samples come twice, others not at all)"
            )
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


def build_loader(
    dataset: Dataset, batch_size: int, *, train: bool, num_workers: int, rank: int = 0, replicas: int = 1
) -> DataLoader:
    """The one DataLoader recipe: training shuffles by (seed, epoch), resumes mid-epoch and drops the last
    partial batch (a batch of one image would break BatchNorm); evaluation reads every sample in order.

    `rank` of `replicas` processes: evaluation reads only this rank's share, every sample on exactly one rank.
    Lightning's own DistributedSampler pads the shares to equal lengths by repeating samples, which would then
    count twice in the error. Ranks may run one batch apart; nothing in evaluation waits per batch (the
    metrics are reduced once, at the end). A set smaller than `replicas` keeps the padding: an empty share
    would leave its rank out of DDP's first-batch buffer broadcast.
    """
    sampler = EpochRandomSampler(dataset, data_seed()) if train else None
    if not train and 1 < replicas <= len(dataset):
        sampler = UnrepeatedDistributedSampler(dataset, num_replicas=replicas, rank=rank, shuffle=False)
    return (ResumableDataLoader if train else DataLoader)(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=train,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=partial(seed_worker, rank=rank) if num_workers > 0 else None,
    )


class ClassificationDataModule(LightningDataModule):
    """Base of the trainers' DataModules: the loader options and the loaders.

    A subclass builds `train_set` (in `setup("fit")`) and `val_set`. Validation and test both read `val_set`:
    CIFAR's test split (the paper's protocol), the labelled validation set of Places365 and ImageNet (their
    test labels are not public). For prediction from its checkpoints, a subclass also tells its class names
    (`display_names`) and its evaluation preprocessing (`eval_preprocessing`); `state_dict` records the class.

    Args:
        batch_size: training images PER DEVICE, not global (as DDP does): each of the trainer's processes
            loads batch_size, so one optimizer step sees batch_size x devices x num_nodes x
            accumulate_grad_batches images; `fit` prints that global batch and its lr when it starts.
        eval_batch_size: images per device for validation and test (default: batch_size).
        num_workers: DataLoader worker processes per device.
    """

    def __init__(self, batch_size: int = 128, eval_batch_size: int | None = None, num_workers: int = 4):
        super().__init__()
        self.save_hyperparameters()  # a subclass's own arguments too: it collects every __init__ up the MRO
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    # --- what a trained network needs to be used again (classification.inference) -------------------
    def state_dict(self) -> dict[str, Any]:
        """{"class_path": "<module>.<qualname>"}: the class that wrote the checkpoint. Lightning saves it under
        the class's qualname; `classification.inference` imports the class by this path and rebuilds it from
        the checkpoint's `datamodule_hyper_parameters`. A subclass with state of its own adds to this dict."""
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}"}

    @property
    def display_names(self) -> list[str]:
        """The class names by index, as shown to a person; read without `setup` (DataError or OSError when the
        files that hold them are not here). Default: `class_names`."""
        return list(self.class_names)

    @property
    def eval_preprocessing(self) -> dict[str, Any]:
        """What evaluation does to an image: {"mean", "std" (RGB, 0..1 units), "crop_size", "resize_size"}:
        shorter side to resize_size, centre crop crop_size, (x / 255 - mean) / std."""
        raise NotImplementedError(f"{type(self).__name__} does not describe its evaluation preprocessing")

    @property
    def world(self) -> tuple[int, int]:
        """(this process's global rank, the number of processes) of the trainer's run; (0, 1) without one."""
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        return build_loader(self.train_set, hp.batch_size, train=True, num_workers=hp.num_workers, rank=self.world[0])

    def val_dataloader(self) -> DataLoader:
        hp, (rank, replicas) = self.hparams, self.world
        batch_size = hp.eval_batch_size or hp.batch_size
        return build_loader(
            self.val_set, batch_size, train=False, num_workers=hp.num_workers, rank=rank, replicas=replicas
        )

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
