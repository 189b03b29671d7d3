"""The classification LightningModule and LightningCLI shared by the CIFAR, Places365 and ImageNet trainers."""

from .cli import AtomicCheckpointIO, ClassificationCLI, TrainingCurves, run_cli
from .module import ClassificationModule, NonFiniteLossError

__all__ = [
    "AtomicCheckpointIO",
    "ClassificationCLI",
    "ClassificationModule",
    "NonFiniteLossError",
    "TrainingCurves",
    "run_cli",
]
