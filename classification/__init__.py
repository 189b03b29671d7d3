"""What the CIFAR, Places365 and ImageNet trainers share: the LightningModule, the LightningCLI and its
callbacks, the DataLoaders, and the image-file DataModules (ImageNet's, and the base of Places365's)."""

from .callbacks import NonFiniteLossError, NonFiniteLossGuard, TrainingCurves
from .checkpoints import AtomicCheckpointIO, RunCheckpoints
from .cli import ClassificationCLI, run_cli
from .imagefolder import BadSampleReport, ImageFolderDataModule
from .imagenet import ImageNetDataModule
from .loaders import ClassificationDataModule
from .module import ClassificationModule
from .samples import DataError

__all__ = [
    "AtomicCheckpointIO",
    "BadSampleReport",
    "ClassificationCLI",
    "ClassificationDataModule",
    "ClassificationModule",
    "DataError",
    "ImageFolderDataModule",
    "ImageNetDataModule",
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "RunCheckpoints",
    "TrainingCurves",
    "run_cli",
]
