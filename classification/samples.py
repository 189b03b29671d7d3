"""Labelled image files, as every image-folder dataset (Places365, ImageNet) lists them, and their Dataset.

`SampleTable` holds the (path, label) pairs; every `Sample` remembers where it was listed (file and line, or
the scanned tree), so a failure while decoding an image hours into training still names its origin.

A bad sample (missing file, corrupt or truncated image) raises DataError naming the file and the list line.
With `skip_bad`, item i whose image cannot be loaded is replaced by the next loadable sample (i+1, i+2, ...)
and carries the message of its own failure: batches keep their size (no empty batch, no rank of a DDP run
waiting for another), and the main process counts exactly one message per bad sample however many
DataLoader workers loaded them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .transforms import read_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class DataError(ValueError):
    """Bad dataset input. The message names the file (and line) and what was expected."""


@dataclass(frozen=True)
class Sample:
    """One labelled image. `origin` says where it was listed, e.g. "places365_val.txt line 12"."""

    path: str
    label: int
    origin: str


class SampleTable:
    """Image paths (relative to `root`) and labels, held in numpy arrays.

    Places365-Challenge lists 8M images: as Python objects they take ~1.5 GB that every DataLoader worker
    copies page by page as reference counts touch them; as a byte blob plus offsets they take ~0.3 GB, shared.
    `origin` names the list file (entry i came from line `lines[i]`) or the scanned tree.
    """

    def __init__(self, root: str | Path, paths: list[str], labels: list[int], origin: str, lines=None):
        encoded = [p.encode() for p in paths]
        self.root = os.fspath(root)
        self.origin = origin
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self.offsets[1:])
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.lines = None if lines is None else np.asarray(lines, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Sample:
        rel = self.blob[self.offsets[i] : self.offsets[i + 1]].tobytes().decode()
        origin = self.origin if self.lines is None else f"{self.origin} line {self.lines[i]}"
        return Sample(os.path.join(self.root, rel), int(self.labels[i]), origin)


@dataclass
class Skipped:
    """Bad entries dropped while reading a list or a tree (only when skipping is asked for)."""

    count: int = 0
    examples: list[str] = field(default_factory=list)  # the first few messages, for the report

    def add(self, message: str) -> None:
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(message)


def scan_class_folders(folder: str | Path, class_ids: dict[str, int], *, what: str = "class folder") -> SampleTable:
    """Samples from a tree `folder/<class>/<image>`, where `<class>` may span several directory levels.

    Class ids come from `class_ids` (folder spelling -> id), never from the folders' sort order. A directory
    holding images whose path matches no class raises DataError naming it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{what} tree {folder} not found")
    paths, labels = [], []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        images = sorted(f for f in filenames if f.lower().endswith(IMAGE_SUFFIXES))
        if not images:
            continue
        rel = Path(dirpath).relative_to(folder).as_posix()
        if rel not in class_ids:
            known = ", ".join(sorted(class_ids)[:3])
            raise DataError(f"{dirpath}: holds {len(images)} images but {rel!r} is no {what} (such as {known}, ...)")
        paths.extend(f"{rel}/{f}" for f in images)
        labels.extend([class_ids[rel]] * len(images))
    if not paths:
        raise DataError(f"{what} tree {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return SampleTable(folder, paths, labels, f"the {what} tree {folder}")


class ImageSampleDataset(Dataset):
    """Sample i -> (image, label) with image (3, S, S), or (10, 3, S, S) for ten-crop evaluation.

    With `skip_bad`, items are (image, label, bad) where `bad` is "" or the message of sample i's failure.
    More than `max_consecutive_bad` unloadable samples in a row raise DataError: that is a wrong image
    folder, not a few bad files.
    """

    def __init__(
        self,
        samples: SampleTable,
        transform: Callable[[np.ndarray], torch.Tensor],
        *,
        skip_bad: bool = False,
        max_consecutive_bad: int = 64,
    ):
        self.samples = samples
        self.transform = transform
        self.skip_bad = skip_bad
        self.max_consecutive_bad = max_consecutive_bad

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        """(image tensor, label) of sample `index`; DataError naming the file and its list line on failure."""
        sample = self.samples[index]
        try:
            image = read_image(sample.path)
        except FileNotFoundError:
            reason = "file not found"
        except (OSError, ValueError) as e:
            reason = str(e)
        else:
            return self.transform(image), sample.label
        raise DataError(f"{sample.path}: {reason} (listed in {sample.origin})")

    def __getitem__(self, index: int):
        if not self.skip_bad:
            return self.load(index)
        bad = ""
        for step in range(self.max_consecutive_bad + 1):
            try:
                image, label = self.load((index + step) % len(self))
            except DataError as e:
                bad = bad or str(e)  # report sample `index` only: the others report themselves
                last = e
                continue
            return image, label, bad
        raise DataError(
            f"{self.max_consecutive_bad + 1} consecutive samples could not be loaded, starting at {bad}; "
            f"last: {last}. Is the image folder right?"
        )
