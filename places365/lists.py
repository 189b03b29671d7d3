"""Reading the Places365 release files as they are: the categories file, the image lists, the class folders.

Every parser returns `Sample`s that remember where they came from (file and line), so a failure while
decoding an image hours into training still names the list line that pointed at it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CATEGORIES_FILE = "categories_places365.txt"
NUM_CLASSES = 365
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


def read_categories(path: str | Path, num_classes: int = NUM_CLASSES) -> list[str]:
    """Class names by id from `categories_places365.txt` (lines `/a/airfield 0`, ids 0..364 in file order).

    Returns the names as written (`/a/apartment_building/outdoor`). Raises DataError naming the line on a
    malformed line, an id out of order, or a class count other than `num_classes`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"categories file {path} not found (expected the devkit's {CATEGORIES_FILE})")
    names: list[str] = []
    for lineno, line in _lines(path):
        fields = line.split()
        if len(fields) != 2 or not fields[1].isdigit() or not fields[0].startswith("/"):
            raise DataError(f"{path} line {lineno}: expected '/<letter>/<name> <id>', got {line!r}")
        if int(fields[1]) != len(names):
            raise DataError(f"{path} line {lineno}: expected id {len(names)} (ids run 0.. in file order), got {line!r}")
        names.append(fields[0])
    if len(names) != num_classes:
        raise DataError(f"{path}: expected {num_classes} categories, found {len(names)}")
    return names


def short_name(category: str) -> str:
    """`/a/apartment_building/outdoor` -> `apartment_building/outdoor` (drops the index letter)."""
    parts = category.strip("/").split("/")
    return "/".join(parts[1:]) if len(parts) > 1 and len(parts[0]) == 1 else "/".join(parts)


def read_image_list(
    list_file: str | Path,
    image_dir: str | Path,
    num_classes: int,
    *,
    skip_bad: bool = False,
    skipped: Skipped | None = None,
) -> SampleTable:
    """Samples from an official list: `/a/airfield/00000001.jpg 0` (train) or `Places365_val_00000001.jpg 165`.

    Paths are relative to `image_dir`, with or without a leading slash. A malformed line or a label outside
    0..num_classes-1 raises DataError naming the file and line, or with `skip_bad` is counted in `skipped`.
    Files are not touched here (8M stat calls would take minutes); a missing image fails when it is loaded.
    """
    list_file = Path(list_file)
    if not list_file.is_file():
        raise DataError(f"image list {list_file} not found")
    paths, labels, lines = [], [], []
    for lineno, line in _lines(list_file):
        fields = line.split()
        error = None
        if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
            error = f"expected '<image path> <label>', got {line!r}"
        elif not 0 <= int(fields[1]) < num_classes:
            error = f"label {fields[1]} is outside 0..{num_classes - 1}"
        origin = f"{list_file} line {lineno}"
        if error is not None:
            if not skip_bad:
                raise DataError(f"{origin}: {error}")
            if skipped is not None:
                skipped.add(f"{origin}: {error}")
            continue
        paths.append(fields[0].lstrip("/"))
        labels.append(int(fields[1]))
        lines.append(lineno)
    if not paths:
        raise DataError(f"image list {list_file} holds no usable lines")
    return SampleTable(image_dir, paths, labels, str(list_file), lines)


def folder_class_ids(categories: list[str]) -> dict[str, int]:
    """Every spelling of a class folder in the ImageFolder ("easyformat") trees -> class id.

    The official easyformat tree flattens three-level names with a dash (`apartment_building-outdoor`);
    users also unpack it nested (`apartment_building/outdoor`) or keep the index letter (`a/airfield`).
    Category names use only [a-z_/], so a dash is never part of a name and the spellings cannot collide.
    """
    ids = {}
    for idx, category in enumerate(categories):
        name = short_name(category)
        letter = category.strip("/").split("/")[0]
        for spelling in (name, name.replace("/", "-")):
            ids[spelling] = idx
            ids[f"{letter}/{spelling}"] = idx
    return ids


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


def _lines(path: Path):
    """(line number, stripped line) for every non-blank line; the release files have no trailing newline."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if line:
                yield lineno, line
