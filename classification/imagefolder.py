"""The DataModule of the large-scale image datasets (Places365, ImageNet): image files on disk.

A subclass only says where the samples are (`train_samples()`, `val_samples()`) and what the classes are;
this class builds the datasets with the albumentations pipelines (the loaders are the shared ones of
`ClassificationDataModule`), and with `skip_bad_samples` counts what was skipped for `BadSampleReport`, which
reports it at the end of every epoch.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from .loaders import ClassificationDataModule, augment_seed
from .samples import ImageSampleDataset, SampleTable, Skipped
from .transforms import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform, build_train_transform, normalize

log = logging.getLogger(__name__)


class ImageFolderDataModule(ClassificationDataModule):
    """Base of the image-file DataModules. Batches: (images (B, 3, S, S), labels (B,)), B = batch_size per
    device; with `ten_crop`, evaluation images are (B, 10, 3, S, S). The loaders yield uint8 images; they are
    normalised to float32 on the device, after the transfer (`on_after_batch_transfer`).

    Args (besides the loader options of ClassificationDataModule):
        root: the release folder.
        crop_size: training crop and evaluation centre crop (224).
        resize_size: evaluation shorter side before the centre crop (256).
        scale: area range of the training random-resized crop.
        ten_crop: evaluate on ten crops (corners, centre, mirrored) and average their softmax.
        skip_bad_samples: skip a missing or corrupt image or a bad list line instead of stopping; the skipped
            count is reported at the end of each epoch (by BadSampleReport, which the CLI adds).
        mean, std: RGB normalisation, in 0..1 units (ImageNet statistics).
    """

    def __init__(
        self,
        root: str,
        crop_size: int = 224,
        resize_size: int = 256,
        scale: tuple[float, float] = (0.08, 1.0),
        ten_crop: bool = False,
        skip_bad_samples: bool = False,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        **kwargs,
    ):
        # the loader options are the base class's (LightningCLI resolves **kwargs)
        super().__init__(**kwargs)
        # bad list lines dropped while reading (skip_bad_samples only), per list: val and test read the val list
        self.list_skipped = {"train": Skipped(), "val": Skipped()}
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

    @property
    def eval_preprocessing(self) -> dict[str, Any]:
        hp = self.hparams
        return {"mean": hp.mean, "std": hp.std, "crop_size": hp.crop_size, "resize_size": hp.resize_size}

    # --- datasets ------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        hp = self.hparams
        reported = self.trainer is None or any(isinstance(c, BadSampleReport) for c in self.trainer.callbacks)
        if hp.skip_bad_samples and not reported:  # skipping is never silent
            raise ValueError("skip_bad_samples needs the BadSampleReport callback (the CLI adds it to every run)")
        log.info("%s: %d classes", type(self).__name__, len(self.class_names))  # reads and checks them first
        if stage == "fit" and self.train_set is None:
            transform = build_train_transform(hp.crop_size, scale=tuple(hp.scale))
            # the main process (num_workers=0) draws from this rank's seed; workers are reseeded in seed_worker
            transform.set_random_seed(augment_seed(self.world[0]))
            self.train_set = ImageSampleDataset(self.train_samples(), transform, skip_bad=hp.skip_bad_samples)
        if self.val_set is None:
            transform = build_eval_transform(hp.crop_size, hp.resize_size, ten_crop=hp.ten_crop)
            self.val_set = ImageSampleDataset(self.val_samples(), transform, skip_bad=hp.skip_bad_samples)
        for split, skipped in self.list_skipped.items():
            if skipped.count:
                rank_zero_warn(
                    f"skip_bad_samples: skipped {skipped.count} bad line(s) of the {split} list, e.g. "
                    + "; ".join(skipped.examples)
                )

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


class BadSampleReport(Callback):
    """At the end of each train / validation / test epoch: log `<stage>/bad_samples` and warn with examples.

    Counts are summed over all DDP processes. The CLI adds it to every run; it does nothing for data that
    does not skip (an ImageFolderDataModule without skip_bad_samples, CIFAR).
    """

    def _report(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        dm = trainer.datamodule
        if not isinstance(dm, ImageFolderDataModule) or not dm.hparams.skip_bad_samples:
            return
        local = dm.bad_counts.pop(stage, 0)
        examples = dm.bad_examples.pop(stage, [])
        if trainer.sanity_checking:
            return
        total = int(trainer.strategy.reduce(torch.tensor(float(local), device=pl_module.device), reduce_op="sum"))
        pl_module.log(f"{stage}/bad_samples", float(total))
        split = "train" if stage == "train" else "val"  # the list this stage reads, and no other
        lines = dm.list_skipped[split].count
        if total or lines:
            message = f"epoch {trainer.current_epoch} {stage}: skipped {total} bad sample(s)"
            if lines:
                message += f" (+ {lines} bad list lines dropped when the {split} list was read)"
            if examples:
                message += f", e.g. {'; '.join(examples)}"
            rank_zero_warn(message)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(trainer, pl_module, "test")
