"""What the Places365 and ImageNet DataModules share: loaders, transforms, and the bad-sample report.

A subclass only says where the samples are (`train_samples()`, `val_samples()`) and how many classes there
are; this class builds the datasets with the albumentations pipelines, the DataLoaders, and with
`skip_bad_samples` counts what was skipped and reports it at the end of every epoch.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from classification.loaders import EpochRandomSampler, ResumableDataLoader
from classification.workers import seed_worker

from .dataset import ImageSampleDataset
from .lists import SampleTable, Skipped
from .transforms import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform, build_train_transform, normalize

log = logging.getLogger(__name__)


class ImageClassificationDataModule(LightningDataModule):
    """Base of the large-scale image DataModules. Batches: (images (B, 3, S, S), labels (B,)); with
    `ten_crop`, evaluation images are (B, 10, 3, S, S). The loaders yield uint8 images; they are normalised
    to float32 on the device, after the transfer (`on_after_batch_transfer`). `batch_size` is the global
    batch; B above is its per-device share, batch_size / world_size.

    Args:
        root: the release folder.
        batch_size: GLOBAL, not per device: the minibatch of one optimiser step, all devices together (the
            paper's figure); each of the trainer's world_size processes loads batch_size / world_size (CIFAR
            takes the per-device batch instead).
        eval_batch_size: the same, global, for validation and test (default: batch_size; lower it for ten-crop).
        num_workers: DataLoader worker processes per device.
        crop_size: training crop and evaluation centre crop (224).
        resize_size: evaluation shorter side before the centre crop (256).
        scale: area range of the training random-resized crop.
        ten_crop: evaluate on ten crops (corners, centre, mirrored) and average their softmax.
        skip_bad_samples: skip a missing or corrupt image or a bad list line instead of stopping; the skipped
            count is reported at the end of each epoch.
        mean, std: RGB normalisation, in 0..1 units (ImageNet statistics).
    """

    def __init__(
        self,
        root: str,
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        num_workers: int = 8,
        crop_size: int = 224,
        resize_size: int = 256,
        scale: tuple[float, float] = (0.08, 1.0),
        ten_crop: bool = False,
        skip_bad_samples: bool = False,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.train_set: ImageSampleDataset | None = None
        self.val_set: ImageSampleDataset | None = None
        self.list_skipped = Skipped()  # bad list lines dropped while reading (skip_bad_samples only)
        self.bad_counts: Counter[str] = Counter()  # per stage, since the last report
        self.bad_examples: dict[str, list[str]] = {}

    @property
    def root(self) -> str:
        """The release folder (`--data.root`)."""
        return self.hparams.root

    # --- what subclasses provide ---------------------------------------------------------------------
    num_classes: int
    class_names: list[str]

    def train_samples(self) -> SampleTable:
        raise NotImplementedError

    def val_samples(self) -> SampleTable:
        raise NotImplementedError

    # --- datasets and loaders ------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        hp = self.hparams
        log.info("%s: %d classes", type(self).__name__, len(self.class_names))  # reads and checks them first
        if stage == "fit" and self.train_set is None:
            transform = build_train_transform(hp.crop_size, scale=tuple(hp.scale))
            # the main process (num_workers=0) follows seed_everything; workers are reseeded in seed_worker
            transform.set_random_seed(torch.initial_seed() % 2**32)
            self.train_set = ImageSampleDataset(self.train_samples(), transform, skip_bad=hp.skip_bad_samples)
        if self.val_set is None:
            transform = build_eval_transform(hp.crop_size, hp.resize_size, ten_crop=hp.ten_crop)
            self.val_set = ImageSampleDataset(self.val_samples(), transform, skip_bad=hp.skip_bad_samples)
        if self.list_skipped.count:
            rank_zero_warn(
                f"skip_bad_samples: skipped {self.list_skipped.count} bad list line(s), e.g. "
                + "; ".join(self.list_skipped.examples)
            )
        # attached here, not left to the config, so skipping is never silent
        if hp.skip_bad_samples and self.trainer is not None and not self._has_report(self.trainer):
            self.trainer.callbacks.append(BadSampleReport())

    def per_device(self, batch_size: int) -> int:
        world = self.trainer.world_size if self.trainer is not None else 1
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} does not split over {world} processes")
        return batch_size // world

    def _loader(self, dataset: ImageSampleDataset, batch_size: int, train: bool) -> DataLoader:
        workers = self.hparams.num_workers
        return (ResumableDataLoader if train else DataLoader)(
            dataset,
            batch_size=self.per_device(batch_size),
            # seeded like the transform in setup (seed_everything's seed): a resumed run replays the order
            sampler=EpochRandomSampler(dataset, torch.initial_seed() % 2**32) if train else None,
            drop_last=train,  # a last batch of one image would break BatchNorm
            num_workers=workers,
            worker_init_fn=seed_worker if workers > 0 else None,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.hparams.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.hparams.eval_batch_size or self.hparams.batch_size, train=False)

    def test_dataloader(self) -> DataLoader:
        """The labelled validation set (the official test labels are not public)."""
        return self.val_dataloader()

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """With skip_bad_samples, count the batch's bad-sample messages and pass (images, labels) on."""
        if not self.hparams.skip_bad_samples:
            return batch
        images, labels, bad = batch
        bad = [m for m in bad if m]
        if bad:
            stage = self._stage()
            self.bad_counts[stage] += len(bad)
            examples = self.bad_examples.setdefault(stage, [])
            examples.extend(bad[: 3 - len(examples)])
        return images, labels

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """uint8 images -> normalised float32, on the device."""
        images, labels = batch
        return normalize(images, self.hparams.mean, self.hparams.std), labels

    def _stage(self) -> str:
        trainer = self.trainer
        if trainer is None or trainer.training:
            return "train"
        return "test" if trainer.testing else "val"

    @staticmethod
    def _has_report(trainer: Trainer) -> bool:
        return any(isinstance(cb, BadSampleReport) for cb in trainer.callbacks)


class BadSampleReport(Callback):
    """At the end of each train / validation / test epoch: log `<stage>/bad_samples` and warn with examples.

    Counts are summed over all DDP processes; the DataModule adds this callback itself when it skips.
    """

    def _report(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        dm = trainer.datamodule
        if not isinstance(dm, ImageClassificationDataModule):
            return
        local = dm.bad_counts.pop(stage, 0)
        examples = dm.bad_examples.pop(stage, [])
        if trainer.sanity_checking:
            return
        total = int(trainer.strategy.reduce(torch.tensor(float(local), device=pl_module.device), reduce_op="sum"))
        pl_module.log(f"{stage}/bad_samples", float(total))
        if total or dm.list_skipped.count:
            message = f"epoch {trainer.current_epoch} {stage}: skipped {total} bad sample(s)"
            if dm.list_skipped.count:
                message += f" (+ {dm.list_skipped.count} bad list lines dropped when the lists were read)"
            if examples:
                message += f", e.g. {'; '.join(examples)}"
            rank_zero_warn(message)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(trainer, pl_module, "test")
