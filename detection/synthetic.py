"""A small synthetic detection dataset in exactly COCO's instances format, for smoke runs and tests.

Each image is a noisy background with one to four non-overlapping objects. An object's class is fixed by its
shape and its colour (hue jittered, brightness varied), so a detector learns it in a few hundred iterations:

    red rectangle (id 1), green ellipse (id 3), blue triangle (id 7), yellow diamond (id 11)

Category ids have gaps, like COCO's 1..90 for 80 classes, so the contiguous-id mapping of an engine is
exercised. Pure numpy / PIL / json: importing it needs neither detectron2 nor mmdet.

Layout under `root` (the COCO 2017 layout with its own names):
    annotations/instances_synthetic_{train,val}.json
    train/000000.jpg ...    val/000000.jpg ...
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from backbones.fileio.atomic import atomic_write

SYNTHETIC_CLASSES = ("red_rectangle", "green_ellipse", "blue_triangle", "yellow_diamond")
SYNTHETIC_CATEGORY_IDS = (1, 3, 7, 11)
# The smoke runs' dataset, one for both engines: detectron2's (detection/detectron2/data.py) and mmdet's smoke config
# (configs/mmdet/smoke, checked equal by the tests) train and evaluate on the very same files.
SMOKE_OPTIONS = {"num_train": 400, "num_val": 60, "image_size": 128, "seed": 0}
_COLOURS = {  # RGB of each class; the generator jitters them
    "red_rectangle": (220, 40, 40),
    "green_ellipse": (40, 200, 60),
    "blue_triangle": (40, 80, 230),
    "yellow_diamond": (230, 210, 40),
}
_VERSION = 1  # bump when the generated content changes, so older copies are regenerated
_ELLIPSE_VERTICES = 32


def _polygon(shape: str, x0: float, y0: float, w: float, h: float) -> list[tuple[float, float]]:
    """Vertices of a shape filling the box (x0, y0, w, h); the box is the polygon's exact extent."""
    if shape == "rectangle":
        return [(x0, y0), (x0 + w, y0), (x0 + w, y0 + h), (x0, y0 + h)]
    if shape == "triangle":
        return [(x0 + w / 2, y0), (x0 + w, y0 + h), (x0, y0 + h)]
    if shape == "diamond":
        return [(x0 + w / 2, y0), (x0 + w, y0 + h / 2), (x0 + w / 2, y0 + h), (x0, y0 + h / 2)]
    cx, cy = x0 + w / 2, y0 + h / 2
    angles = np.linspace(0, 2 * math.pi, _ELLIPSE_VERTICES, endpoint=False)
    return [(cx + w / 2 * math.cos(a), cy + h / 2 * math.sin(a)) for a in angles]


def _polygon_area(points: list[tuple[float, float]]) -> float:
    """Shoelace area, the figure COCO stores as `area` for polygon annotations."""
    xs = np.array([p[0] for p in points])
    ys = np.array([p[1] for p in points])
    return float(0.5 * abs(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))))


def _overlaps(box: tuple[float, ...], boxes: list[tuple[float, ...]], margin: float = 2.0) -> bool:
    x, y, w, h = box
    return any(
        x < bx + bw + margin and bx < x + w + margin and y < by + bh + margin and by < y + h + margin
        for bx, by, bw, bh in boxes
    )


def _render(rng: np.random.Generator, size: int) -> tuple[Image.Image, list[dict]]:
    """One (size, size) RGB image and its objects: [{"category_id", "bbox", "polygon"}]."""
    base = rng.uniform(70, 170, size=3)
    noise = rng.normal(0, 18, size=(size, size, 3))
    gradient = np.linspace(-25, 25, size)[None, :, None] * rng.choice([-1, 1])
    pixels = np.clip(base + noise + gradient, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)

    objects: list[dict] = []
    boxes: list[tuple[float, ...]] = []
    for _ in range(int(rng.integers(1, 5))):
        for _attempt in range(20):  # rejection sampling keeps objects apart, so every mask is the whole shape
            w, h = (float(v) for v in rng.uniform(0.12, 0.4, size=2) * size)
            x0 = float(rng.uniform(1, size - w - 1))
            y0 = float(rng.uniform(1, size - h - 1))
            if not _overlaps((x0, y0, w, h), boxes):
                break
        else:
            continue
        label = int(rng.integers(len(SYNTHETIC_CLASSES)))
        name = SYNTHETIC_CLASSES[label]
        # Rounded once, so the stored polygon, box and area agree exactly.
        points = [(round(px, 2), round(py, 2)) for px, py in _polygon(name.split("_")[1], x0, y0, w, h)]
        colour = np.clip(np.array(_COLOURS[name]) * rng.uniform(0.75, 1.1) + rng.normal(0, 12, 3), 0, 255)
        draw.polygon(points, fill=tuple(int(c) for c in colour))
        boxes.append((x0, y0, w, h))
        xs, ys = [px for px, _ in points], [py for _, py in points]
        bbox = [min(xs), min(ys), round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2)]
        objects.append({"category_id": SYNTHETIC_CATEGORY_IDS[label], "bbox": bbox, "polygon": points})
    return image, objects


def _split_params(split: str, num_images: int, image_size: int, seed: int) -> dict:
    return {"split": split, "num_images": num_images, "image_size": image_size, "seed": seed, "version": _VERSION}


def _is_complete(json_path: Path, image_dir: Path, params: dict) -> bool:
    """True when the JSON exists, was written for these parameters and every image it lists is on disk."""
    try:
        data = json.loads(json_path.read_text())
    except (OSError, ValueError):
        return False
    if data.get("info", {}).get("senet_synthetic") != params:
        return False
    return all((image_dir / im["file_name"]).is_file() for im in data["images"])


def _write_split(json_path: Path, image_dir: Path, params: dict) -> None:
    image_dir.mkdir(parents=True, exist_ok=True)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    split_salt = {"train": 0, "val": 1}.get(params["split"], 2)
    images, annotations = [], []
    for index in range(params["num_images"]):
        # One generator per image: the content of image i never depends on how many images are asked for.
        rng = np.random.default_rng([params["seed"], split_salt, index])
        image, objects = _render(rng, params["image_size"])
        file_name = f"{index:06d}.jpg"
        atomic_write(image_dir / file_name, lambda p, im=image: im.save(p, format="JPEG", quality=92))
        image_id = index + 1
        size = params["image_size"]
        images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
        for obj in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": obj["category_id"],
                    "bbox": obj["bbox"],
                    "area": _polygon_area(obj["polygon"]),
                    "iscrowd": 0,
                    "segmentation": [[c for point in obj["polygon"] for c in point]],
                }
            )
    data = {
        "info": {"description": "senet-suite synthetic shapes", "senet_synthetic": params},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": cid, "name": name, "supercategory": "shape"}
            for cid, name in zip(SYNTHETIC_CATEGORY_IDS, SYNTHETIC_CLASSES, strict=True)
        ],
    }
    # The JSON goes last: its presence (with matching parameters) marks the split complete.
    atomic_write(json_path, lambda p: p.write_text(json.dumps(data)))


def synthetic_coco_paths(root: str | os.PathLike) -> dict[str, Path]:
    """Where `make_synthetic_coco(root)` puts each split: {"train_json", "train_images", "val_json", "val_images"}."""
    root = Path(root)
    paths = {}
    for split in ("train", "val"):
        paths[f"{split}_json"] = root / "annotations" / f"instances_synthetic_{split}.json"
        paths[f"{split}_images"] = root / split
    return paths


def make_synthetic_coco(
    root: str | os.PathLike, *, num_train: int = 200, num_val: int = 50, image_size: int = 192, seed: int = 0
) -> dict[str, Path]:
    """Generate (or reuse) the synthetic dataset under `root`; deterministic for a seed.

    Returns {"train_json", "train_images", "val_json", "val_images"}. A split whose JSON already records the
    same parameters and whose images are all present is left untouched; anything else is rewritten.
    """
    if image_size < 32:
        raise ValueError(f"image_size={image_size} is too small for the synthetic shapes (need >= 32)")
    paths = synthetic_coco_paths(root)
    for split, num in (("train", num_train), ("val", num_val)):
        json_path, image_dir = paths[f"{split}_json"], paths[f"{split}_images"]
        params = _split_params(split, num, image_size, seed)
        if not _is_complete(json_path, image_dir, params):
            _write_split(json_path, image_dir, params)
    return paths
