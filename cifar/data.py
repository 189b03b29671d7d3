"""CIFARDataModule: CIFAR-10 / CIFAR-100 (official python-version files, or a generated stand-in) for Lightning.

The paper's protocol: train on the 50k training images, report the error on the 10k test images; so the
validation and the test loaders both read the test split.

Augmentation (`augment`):
  - "albumentations" (default): per image in the DataLoader workers (cifar.transforms.train_transform);
  - "batched": per batch on the training device (cifar.transforms.BatchAugment): the loader ships uint8
    images, `on_after_batch_transfer` pads, crops, flips and normalises. Its random choices are a function of
    (seed, epoch, sample index), so a run resumed from a checkpoint sees exactly the augmentation an
    uninterrupted run would (the albumentations path is reproducible for a fixed seed but not across resume);
  - "none": normalisation only.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from classification.loaders import ClassificationDataModule, augment_seed, data_seed

from .files import SPECS, load_class_names, load_split
from .synthetic import make_synthetic
from .transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    BatchAugment,
    eval_transform,
    to_chw,
    train_transform,
)

STATS = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "cifar100": (CIFAR100_MEAN, CIFAR100_STD)}


class CIFARImages(Dataset):
    """In-memory images uint8 (N, 32, 32, 3) and labels (N,).

    With an albumentations `transform`: item i -> (float (3, 32, 32), label). Without: the "raw" form of the
    batched path, item i -> (uint8 (3, 32, 32), label, i); the index lets the device side derive the sample's
    augmentation.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Any = None):
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.transform = transform
        # keep the layout the item needs: HWC numpy for albumentations, CHW tensor for the raw path
        self.images = images if transform is not None else torch.from_numpy(to_chw(images))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple:
        if self.transform is None:
            return self.images[i], self.labels[i], i
        return self.transform(image=self.images[i])["image"], self.labels[i]


class CIFARDataModule(ClassificationDataModule):
    """CIFAR-10 or CIFAR-100 for `ClassificationModule`; batches are (images float (B, 3, 32, 32), labels (B,)),
    B = batch_size per device.

    Args (besides the loader options of ClassificationDataModule):
        dataset: "cifar10" or "cifar100".
        root: folder holding `cifar-10-batches-py/` or `cifar-100-python/` (or that folder itself).
        download: fetch and extract the official archive into `root` if it is missing (torchvision's
            downloader, which checks the archive's MD5). Off by default: nothing is downloaded unless asked.
        verify_md5: check every file against the official MD5 before reading it.
        synthetic: ignore `root` and train on `make_synthetic` images (`synthetic_train` + `synthetic_val`).
        augment: "albumentations", "batched" or "none" (see the module docstring).
    """

    def __init__(
        self,
        dataset: Literal["cifar10", "cifar100"] = "cifar10",
        root: str = "datasets",
        download: bool = False,
        verify_md5: bool = False,
        synthetic: bool = False,
        synthetic_train: int = 5000,
        synthetic_val: int = 1000,
        augment: Literal["albumentations", "batched", "none"] = "albumentations",
        **kwargs,
    ):
        # the loader options are the base class's (LightningCLI resolves **kwargs)
        super().__init__(**kwargs)
        if dataset not in SPECS:
            raise ValueError(f"dataset={dataset!r} is not one of {sorted(SPECS)}")
        self.spec = SPECS[dataset]
        self.batch_augment: BatchAugment | None = None
        self.class_names: list[str] | None = None

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def display_names(self) -> list[str]:
        """The class names (`synthetic_i` for the generated data), read from the dataset's meta file."""
        if self.class_names is not None:
            return list(self.class_names)
        hp = self.hparams
        if hp.synthetic:
            return [f"synthetic_{i}" for i in range(self.num_classes)]
        return load_class_names(hp.root, self.spec, hp.verify_md5)

    @property
    def eval_preprocessing(self) -> dict[str, Any]:
        """The dataset's own mean and std; the 32 x 32 images are seen whole (no resize, no crop)."""
        mean, std = STATS[self.hparams.dataset]
        return {"mean": mean, "std": std, "crop_size": 32, "resize_size": 32}

    def prepare_data(self) -> None:
        """Download only when asked, once per node (Lightning calls this on one process)."""
        hp = self.hparams
        if hp.download and not hp.synthetic:
            from torchvision.datasets import CIFAR10, CIFAR100

            (CIFAR10 if hp.dataset == "cifar10" else CIFAR100)(hp.root, train=True, download=True)

    def setup(self, stage: str | None = None) -> None:
        """Load the test split (validation = test, the paper's protocol) and, to fit, the train split."""
        hp = self.hparams
        mean, std = STATS[hp.dataset]
        per_image = hp.augment == "albumentations"
        # one seed on every DDP rank: the draws are a function of the sample index, which sets the ranks apart
        self.batch_augment = BatchAugment(mean, std, seed=data_seed())
        if self.val_set is None:
            self.class_names = self.display_names
            self.val_set = CIFARImages(*self._split(train=False), eval_transform(mean, std) if per_image else None)
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = CIFARImages(*self._split(train=True), train_transform(mean, std) if per_image else None)
            if per_image:  # the main process's stream (num_workers=0); workers are reseeded in seed_worker
                self.train_set.transform.set_random_seed(augment_seed(self.world[0]))

    def _split(self, train: bool) -> tuple[np.ndarray, np.ndarray]:
        hp = self.hparams
        if hp.synthetic:
            # a fixed dataset, whatever the run's seed
            return make_synthetic(
                self.num_classes, hp.synthetic_train if train else hp.synthetic_val, seed=int(not train)
            )
        return load_split(hp.root, self.spec, train=train, verify_md5=hp.verify_md5)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw batches (uint8 images, labels, indices) -> (normalised images, labels), augmented in training."""
        if len(batch) == 2:  # the albumentations path did everything already
            return batch
        images, labels, index = batch
        trainer = self.trainer
        training = trainer is not None and trainer.training and self.hparams.augment == "batched"
        epoch = trainer.current_epoch if trainer is not None else 0
        return self.batch_augment(images, index, epoch, augment=training), labels
