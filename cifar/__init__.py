"""CIFAR-10/100 for the classification trainer: the official python-version files, augmentation, synthetic data."""

from .data import CIFARDataModule
from .files import CIFARFormatError

__all__ = ["CIFARDataModule", "CIFARFormatError"]
