"""A small generated dataset in the official Places365 layout, for the smoke run.

`Places365DataModule(synthetic=SyntheticPlaces365(...))` writes it in prepare_data when the root is empty
(configs/lightning/smoke/places365_synthetic.yaml); `make_synthetic_places365(root)` writes it directly.

Writes the real `categories_places365.txt` (copied; a placeholder only when the real file cannot be found),
`places365_train_standard.txt` (`/a/airfield/00000001.jpg 0`), `places365_val.txt`
(`Places365_val_00000001.jpg 0`), and the JPEGs in `data_256/<letter>/<name>/` and flat in `val_256/`.
Each used class has its own colour and stripe orientation, so a small network learns it in a few epochs.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .lists import CATEGORIES_FILE, NUM_CLASSES, read_categories

log = logging.getLogger(__name__)

# the real devkit file, in the project's shared/ folder (beside the checkout, or inside it)
_REPO = Path(__file__).resolve().parents[1]
SHARED_CATEGORIES = [base / "shared" / "data" / CATEGORIES_FILE for base in (_REPO.parent, _REPO)]


@dataclass
class SyntheticPlaces365:
    """What to generate: `classes` evenly spaced category ids of the 365, with so many images each.

    Args:
        classes: number of categories that get images (the model still has 365 outputs).
        train_per_class, val_per_class: images per category in the train list and in the val list.
        image_size: side of the square JPEGs (256 as data_256 / val_256).
        seed: random seed of the images.
        categories_file: the devkit's categories file to copy (default: ../shared/data/ beside the checkout).
    """

    classes: int = 8
    train_per_class: int = 48
    val_per_class: int = 12
    image_size: int = 256
    seed: int = 0
    categories_file: str | None = None


def class_image(label_rank: int, classes: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) uint8 RGB: the class's hue and stripe angle, with random phase, contrast and noise."""
    hue = 180.0 * label_rank / classes  # OpenCV hue range 0..180
    colour = cv2.cvtColor(np.uint8([[[hue, 200, 220]]]), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)
    angle = math.pi * label_rank / classes + rng.normal(0, 0.08)
    period = size / rng.uniform(5, 8)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    wave = np.sin(2 * math.pi * (x * math.cos(angle) + y * math.sin(angle)) / period + rng.uniform(0, 2 * math.pi))
    image = colour * (0.65 + rng.uniform(0.2, 0.35) * wave)[..., None] * rng.uniform(0.8, 1.2)
    image += rng.normal(0, 12, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_jpeg(path: Path, image_rgb: np.ndarray, quality: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"could not encode {path}")
    path.write_bytes(buf.tobytes())


def write_categories(root: Path, source: str | Path | None = None) -> list[str]:
    """Copy the devkit categories file into `root`; a placeholder in the same format if it cannot be found."""
    candidates = [Path(source)] if source else SHARED_CATEGORIES
    found = [p for p in candidates if p.is_file()]
    target = root / CATEGORIES_FILE
    if found:
        read_categories(found[0])  # refuse to copy a broken file
        shutil.copyfile(found[0], target)
    else:
        log.warning("%s not found: writing placeholder category names in the official format", candidates[0])
        target.write_text("\n".join(f"/s/synthetic_{i:03d} {i}" for i in range(NUM_CLASSES)))
    return read_categories(target)


def make_synthetic_places365(root: str | Path, spec: SyntheticPlaces365 | None = None) -> Path:
    """Write the dataset described by `spec` under `root` (the release folder) and return `root`."""
    spec = spec or SyntheticPlaces365()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    categories = write_categories(root, spec.categories_file)
    rng = np.random.default_rng(spec.seed)
    labels = [round(i * (NUM_CLASSES - 1) / max(1, spec.classes - 1)) for i in range(spec.classes)]
    train_lines, val_lines = [], []
    val_index = 0
    for rank, label in enumerate(labels):
        name = categories[label]  # "/a/airfield": the train folder layout is the category path
        for i in range(1, spec.train_per_class + 1):
            rel = f"{name}/{i:08d}.jpg"
            write_jpeg(root / "data_256" / rel.lstrip("/"), class_image(rank, spec.classes, spec.image_size, rng))
            train_lines.append(f"{rel} {label}")
        for _ in range(spec.val_per_class):
            val_index += 1
            file = f"Places365_val_{val_index:08d}.jpg"
            write_jpeg(root / "val_256" / file, class_image(rank, spec.classes, spec.image_size, rng))
            val_lines.append(f"{file} {label}")
    # the official lists have no trailing newline; the train list is written last: prepare_data takes its
    # presence to mean the dataset is complete
    (root / "places365_val.txt").write_text("\n".join(val_lines))
    (root / "places365_train_standard.txt").write_text("\n".join(train_lines))
    return root
