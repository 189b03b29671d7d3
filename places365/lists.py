"""Reading the Places365 release files as they are: the categories file and the image lists.

The lists become a `classification.samples.SampleTable` whose samples remember their file and line, so a
failure while decoding an image hours into training still names the list line that pointed at it.
"""

from __future__ import annotations

from pathlib import Path

from classification.samples import DataError, SampleTable, Skipped

CATEGORIES_FILE = "categories_places365.txt"
NUM_CLASSES = 365


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


def _lines(path: Path):
    """(line number, stripped line) for every non-blank line; the release files have no trailing newline."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if line:
                yield lineno, line
