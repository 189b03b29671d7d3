"""Places365 for the classification trainer (tools/train_places365.py): the official releases read as they
are (categories file, image lists, easyformat folders) and a generated stand-in for the smoke run."""

from .datamodule import Places365DataModule
from .lists import read_categories, read_image_list
from .synthetic import SyntheticPlaces365, make_synthetic_places365

__all__ = [
    "Places365DataModule",
    "SyntheticPlaces365",
    "make_synthetic_places365",
    "read_categories",
    "read_image_list",
]
