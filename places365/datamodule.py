"""The Places365 DataModule: the official releases read as they are, class ids from the categories file.

`--data.root DIR` names the release folder. Two layouts are recognised:

- lists (the devkit): `categories_places365.txt`, `places365_train_standard.txt` or
  `places365_train_challenge.txt` (`/a/airfield/00000001.jpg 0`, relative to the train image folder) with
  `data_256/` or `data_large/` (torchvision's `data_256_standard/`, `data_large_challenge/`, ... too), and
  `places365_val.txt` (`Places365_val_00000001.jpg 165`) with `val_256/` or `val_large/`;
- easyformat (ImageFolder): `train/<class>/`, `val/<class>/`, where `<class>` is `airfield`,
  `apartment_building-outdoor` as released, or nested (`apartment_building/outdoor`, `a/airfield`). The
  categories file is needed here as well (`--data.categories_file` when it is not in the root).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from functools import cached_property
from pathlib import Path
from typing import Literal

from classification.imagefolder import ImageFolderDataModule
from classification.samples import DataError, SampleTable, scan_class_folders

from .lists import CATEGORIES_FILE, NUM_CLASSES, folder_class_ids, read_categories, read_image_list, short_name
from .synthetic import SHARED_CATEGORIES, SyntheticPlaces365, make_synthetic_places365

log = logging.getLogger(__name__)

RESOLUTIONS = ("256", "large")


class Places365DataModule(ImageFolderDataModule):
    """Places365-Standard / -Challenge: 365 classes; batches (images (B, 3, S, S), labels (B,)).

    Args (besides those of ImageFolderDataModule):
        root: the release folder (see the module docstring for what it holds).
        train_set: "standard" (1.8M images) or "challenge" (8M; the paper's Table 6).
        resolution: "256" (data_256 / val_256), "large" (data_large / val_large), or "auto": the first of
            these that exists, for each split.
        layout: "lists", "easyformat", or "auto" (lists when the root holds places365_*.txt files).
        categories_file: the devkit's categories_places365.txt (default: in root).
        synthetic: write a small generated release into root in prepare_data when root holds none (smoke run);
            also its fields as a dict (how the hyperparameters save it, so a checkpoint's rebuild it).
    """

    num_classes = NUM_CLASSES

    def __init__(
        self,
        root: str = "datasets/places365",
        train_set: Literal["standard", "challenge"] = "standard",
        resolution: Literal["auto", "256", "large"] = "auto",
        layout: Literal["auto", "lists", "easyformat"] = "auto",
        categories_file: str | None = None,
        synthetic: SyntheticPlaces365 | None = None,
        **kwargs,
    ):
        # the loader, batch and augmentation options are the base classes' (LightningCLI resolves **kwargs)
        super().__init__(root, **kwargs)
        if isinstance(synthetic, dict):  # the saved hyperparameters of a checkpoint: checked by the dataclass
            synthetic = SyntheticPlaces365(**synthetic)
        if synthetic is not None:  # plain types only: checkpoints must load with weights_only=True
            self.hparams["synthetic"] = asdict(synthetic)

    def prepare_data(self) -> None:
        spec = self.hparams.synthetic
        if spec is not None and not (Path(self.root) / "places365_train_standard.txt").is_file():
            log.info("writing the synthetic Places365 release to %s", self.root)
            make_synthetic_places365(self.root, SyntheticPlaces365(**spec))

    @cached_property
    def class_names(self) -> list[str]:
        """The 365 category names by class id, as the categories file writes them (`/a/airfield`)."""
        path = self._categories_path()
        if not path.is_file():
            raise DataError(f"{path} not found: pass the devkit's {CATEGORIES_FILE} with --data.categories_file")
        return read_categories(path, NUM_CLASSES)

    @property
    def display_names(self) -> list[str]:
        """The category names without the index letter (`apartment_building/outdoor`); when the run's categories
        file is not here (nor its data), those of the devkit copy in shared/ that the synthetic release copies."""
        if self._categories_path().is_file():
            return [short_name(c) for c in self.class_names]
        found = next((p for p in SHARED_CATEGORIES if p.is_file()), None)
        if found is None:
            raise DataError(f"{self._categories_path()} not found, nor a copy in shared/ ({SHARED_CATEGORIES[0]})")
        return [short_name(c) for c in read_categories(found, NUM_CLASSES)]

    def _categories_path(self) -> Path:
        categories = self.hparams.categories_file
        return Path(categories) if categories else Path(self.root) / CATEGORIES_FILE

    def train_samples(self) -> SampleTable:
        return self._samples("train")

    def val_samples(self) -> SampleTable:
        return self._samples("val")

    def _samples(self, split: str) -> SampleTable:
        root = Path(self.root)
        if self._layout() == "easyformat":
            ids = folder_class_ids(self.class_names)
            return scan_class_folders(root / split, ids, what="Places365 class folder")
        name = f"places365_train_{self.hparams.train_set}.txt" if split == "train" else "places365_val.txt"
        return read_image_list(
            root / name,
            self._image_dir(split),
            NUM_CLASSES,
            skip_bad=self.hparams.skip_bad_samples,
            skipped=self.list_skipped[split],
        )

    def _layout(self) -> str:
        if self.hparams.layout != "auto":
            return self.hparams.layout
        root = Path(self.root)
        if any(root.glob("places365_*.txt")):
            return "lists"
        if (root / "train").is_dir() or (root / "val").is_dir():
            return "easyformat"
        raise DataError(
            f"{root} holds neither the devkit lists (places365_train_standard.txt, places365_val.txt, ...) nor "
            "the easyformat train/ and val/ folders; --data.root must name the Places365 release folder"
        )

    def _image_dir(self, split: str) -> Path:
        """The image folder of `split`, trying the official name and torchvision's renamed one."""
        root = Path(self.root)
        resolution = self.hparams.resolution
        resolutions = RESOLUTIONS if resolution == "auto" else (resolution,)
        candidates = []
        for res in resolutions:
            if split == "train":
                candidates += [f"data_{res}_{self.hparams.train_set}", f"data_{res}"]
            else:
                candidates.append(f"val_{res}")
        for name in candidates:
            if (root / name).is_dir():
                return root / name
        raise DataError(f"no {split} image folder in {root}: expected one of {', '.join(candidates)}")
