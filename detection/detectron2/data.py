"""Datasets for detectron2: the synthetic smoke dataset under its own names, and a layout check for COCO.

The synthetic splits are registered as `senet_synthetic_train` / `senet_synthetic_val` (own names: detectron2
pre-fills its builtin `coco_*` names with the 80 COCO classes) and are generated on first use under
`$DETECTRON2_DATASETS/synthetic_coco` (default `./datasets/synthetic_coco`).
"""

from __future__ import annotations

import os
from pathlib import Path

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from ..synthetic import SMOKE_OPTIONS, SYNTHETIC_CLASSES, make_synthetic_coco

SYNTHETIC_SPLITS = {"senet_synthetic_train": "train", "senet_synthetic_val": "val"}
COCO_LAYOUT = "coco/train2017/, coco/val2017/ and coco/annotations/instances_train2017.json, instances_val2017.json"


class DatasetLayoutError(FileNotFoundError):
    """A dataset named in the config whose files are not where detectron2 looks for them."""


def datasets_root() -> Path:
    """$DETECTRON2_DATASETS (default ./datasets), where detectron2 looks for its builtin datasets."""
    return Path(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")))


def synthetic_paths() -> dict[str, Path]:
    """Generate the synthetic dataset if needed (idempotent) and point the registered names' metadata at it."""
    paths = make_synthetic_coco(datasets_root() / "synthetic_coco", **SMOKE_OPTIONS)
    for name, split in SYNTHETIC_SPLITS.items():
        files = {"json_file": str(paths[f"{split}_json"]), "image_root": str(paths[f"{split}_images"])}
        meta = MetadataCatalog.get(name)
        if any(getattr(meta, k, None) != v for k, v in files.items()):
            MetadataCatalog.remove(name)  # DETECTRON2_DATASETS moved: metadata values cannot be overwritten
            MetadataCatalog.get(name).set(**files, evaluator_type="coco", thing_classes=list(SYNTHETIC_CLASSES))
    return paths


def _load_synthetic(name: str) -> list[dict]:
    paths = synthetic_paths()
    split = SYNTHETIC_SPLITS[name]
    return load_coco_json(str(paths[f"{split}_json"]), str(paths[f"{split}_images"]), name)


def register_synthetic_datasets() -> None:
    """Register the synthetic splits (data generated lazily, on first DatasetCatalog.get)."""
    for name in SYNTHETIC_SPLITS:
        if name not in DatasetCatalog.list():
            DatasetCatalog.register(name, lambda name=name: _load_synthetic(name))
            MetadataCatalog.get(name).set(evaluator_type="coco", thing_classes=list(SYNTHETIC_CLASSES))


def prepare_datasets(cfg: CfgNode) -> None:
    """Generate the synthetic splits the config names; check that every other COCO-format dataset is on disk.

    Raises DatasetLayoutError naming the missing files and the layout detectron2 expects under
    $DETECTRON2_DATASETS, before any model is built or annotation file parsed.
    """
    names = (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST)
    if any(name in SYNTHETIC_SPLITS for name in names):
        synthetic_paths()  # both splits at once
    for name in names:
        if name in SYNTHETIC_SPLITS:
            continue
        if name not in DatasetCatalog.list():
            raise DatasetLayoutError(
                f"dataset {name!r} (in DATASETS.TRAIN/TEST) is not registered with detectron2; "
                f"known COCO names include coco_2017_train, coco_2017_val, {', '.join(SYNTHETIC_SPLITS)}"
            )
        meta = MetadataCatalog.get(name)
        json_file, image_root = getattr(meta, "json_file", None), getattr(meta, "image_root", None)
        if json_file is None or image_root is None:
            continue  # not a COCO-format dataset: its own loader reports what is missing
        problems = []
        if not os.path.isfile(json_file):
            problems.append(f"annotation file {json_file} is missing")
        if not os.path.isdir(image_root) or not _has_entries(image_root):
            problems.append(f"image folder {image_root} is missing or empty")
        if problems:
            raise DatasetLayoutError(
                f"dataset {name!r}: {'; '.join(problems)}. Detectron2 expects COCO 2017 under "
                f"$DETECTRON2_DATASETS (now {datasets_root().resolve()}): {COCO_LAYOUT}. Set DETECTRON2_DATASETS "
                "to the folder that holds coco/, or try configs/detectron2/smoke/faster_rcnn_se_r50_synthetic.yaml, "
                "which generates its own data."
            )


def _has_entries(folder: str) -> bool:
    with os.scandir(folder) as entries:  # closed at once: a bare scandir() left open warns
        return next(entries, None) is not None
