"""Places365 and ImageNet training on PyTorch Lightning: DataModules for the official releases, the
albumentations pipeline, and the trainers' CLI (tools/train_places365.py, tools/train_imagenet.py)."""

from .data import BadSampleReport, ImageClassificationDataModule
from .datamodule import Places365DataModule
from .dataset import ImageSampleDataset
from .imagenet import ImageNetDataModule
from .lists import DataError, SampleTable, read_categories, read_image_list
from .synthetic import SyntheticPlaces365, make_synthetic_places365
from .transforms import build_eval_transform, build_train_transform, normalize, read_image

__all__ = [
    "BadSampleReport",
    "DataError",
    "ImageClassificationDataModule",
    "ImageNetDataModule",
    "ImageSampleDataset",
    "Places365DataModule",
    "SampleTable",
    "SyntheticPlaces365",
    "build_eval_transform",
    "build_train_transform",
    "make_synthetic_places365",
    "normalize",
    "read_categories",
    "read_image",
    "read_image_list",
]
