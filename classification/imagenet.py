"""The ImageNet (ILSVRC2012) DataModule: `train/<wnid>/*.JPEG` and `val/<wnid>/*.JPEG` under `--data.root`.

Class i is the i-th WordNet id in sorted order, the convention of torchvision, timm and every released
ImageNet checkpoint. The ids come from train/ (from val/ when only val/ exists), so a val/ folder that lacks
a class cannot shift the others. The raw ILSVRC2012 val archive is flat; it must be sorted into
val/<wnid>/ first (e.g. with the widely used valprep.sh).
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path

from .imagefolder import ImageFolderDataModule
from .samples import DataError, SampleTable, scan_class_folders

WNID = re.compile(r"n\d{8}")


class ImageNetDataModule(ImageFolderDataModule):
    """ILSVRC2012 (1000 classes); batches (images (B, 3, S, S), labels (B,)).

    Args: those of ImageFolderDataModule; `root` holds train/ and val/.
    """

    def __init__(self, root: str = "datasets/imagenet", **kwargs):
        # the loader, batch and augmentation options are the base classes' (LightningCLI resolves **kwargs)
        super().__init__(root, **kwargs)

    @cached_property
    def class_names(self) -> list[str]:
        """The WordNet ids by class index (sorted)."""
        root = Path(self.root)
        folder = root / "train" if (root / "train").is_dir() else root / "val"
        if not folder.is_dir():
            raise DataError(f"{root} holds neither train/ nor val/; --data.root must name the ImageNet folder")
        wnids = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if not wnids:
            raise DataError(f"{folder} holds no class folders (expected {folder}/<wnid>/*.JPEG)")
        odd = [w for w in wnids if not WNID.fullmatch(w)]
        if odd:
            raise DataError(f"{folder}: folder(s) {odd[:5]} are not WordNet ids (n01440764, ...)")
        return wnids

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def train_samples(self) -> SampleTable:
        return self._scan("train")

    def val_samples(self) -> SampleTable:
        return self._scan("val")

    def _scan(self, split: str) -> SampleTable:
        folder = Path(self.root) / split
        if folder.is_dir() and any(p.suffix.upper() == ".JPEG" for p in folder.iterdir() if p.is_file()):
            raise DataError(
                f"{folder} holds images directly (the raw ILSVRC2012 archive); sort them into "
                f"{folder}/<wnid>/ first, e.g. with valprep.sh"
            )
        ids = {wnid: i for i, wnid in enumerate(self.class_names)}
        return scan_class_folders(folder, ids, what="ImageNet wnid folder")
