"""The synthetic detection dataset: real COCO instances format, deterministic, reusable, evaluable."""

import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detection.synthetic import SYNTHETIC_CLASSES, make_synthetic_coco


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return root, make_synthetic_coco(root, num_train=12, num_val=6, image_size=96, seed=3)


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def test_layout_and_coco_fields(dataset):
    _, paths = dataset
    for split, count in (("train", 12), ("val", 6)):
        data = json.loads(paths[f"{split}_json"].read_text())
        assert set(data) >= {"info", "images", "annotations", "categories"}
        assert len(data["images"]) == count
        coco = _quiet(COCO, str(paths[f"{split}_json"]))
        cat_ids = sorted(coco.getCatIds())
        assert [c["name"] for c in coco.loadCats(cat_ids)] == list(SYNTHETIC_CLASSES)
        assert cat_ids != list(range(1, len(cat_ids) + 1)), "category ids must have gaps, like COCO's"
        ann_ids = [a["id"] for a in data["annotations"]]
        assert len(ann_ids) == len(set(ann_ids)) and len(ann_ids) >= count
        assert len({im["id"] for im in data["images"]}) == count
        for ann in data["annotations"]:
            image = coco.imgs[ann["image_id"]]
            x, y, w, h = ann["bbox"]
            assert x >= 0 and y >= 0 and w > 0 and h > 0
            assert x + w <= image["width"] and y + h <= image["height"]
            assert ann["iscrowd"] == 0 and ann["category_id"] in cat_ids
            # The mask is the shape: its pixel area agrees with `area`, which is below the box area.
            assert 0 < ann["area"] <= w * h + 1e-3
            assert coco.annToMask(ann).sum() == pytest.approx(ann["area"], rel=0.15, abs=20)
        for image in data["images"]:
            with Image.open(paths[f"{split}_images"] / image["file_name"]) as im:
                assert im.size == (image["width"], image["height"]) and im.mode == "RGB"


def test_ground_truth_scores_ap_one(dataset):
    _, paths = dataset
    gt = _quiet(COCO, str(paths["val_json"]))
    detections = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in gt.dataset["annotations"]
    ]
    dt = _quiet(gt.loadRes, detections)
    evaluator = COCOeval(gt, dt, "bbox")
    _quiet(evaluator.evaluate)
    _quiet(evaluator.accumulate)
    _quiet(evaluator.summarize)
    assert evaluator.stats[0] == pytest.approx(1.0)  # AP@[.5:.95]
    assert evaluator.stats[1] == pytest.approx(1.0)  # AP50


def test_objects_carry_their_class_colour(dataset):
    """The structure a detector learns: inside each box the class's colour dominates the background."""
    _, paths = dataset
    data = json.loads(paths["train_json"].read_text())
    dominant = {1: 0, 3: 1, 7: 2}  # red, green, blue channel; id 11 (yellow) is red + green
    by_image = {im["id"]: im for im in data["images"]}
    for ann in data["annotations"]:
        pixels = np.asarray(Image.open(paths["train_images"] / by_image[ann["image_id"]]["file_name"]))
        x, y, w, h = (int(round(v)) for v in ann["bbox"])
        cy, cx = y + h // 2, x + w // 2
        centre = pixels[cy - 2 : cy + 3, cx - 2 : cx + 3].reshape(-1, 3).mean(0)
        if ann["category_id"] in dominant:
            assert centre.argmax() == dominant[ann["category_id"]]
        else:
            assert centre[2] < min(centre[0], centre[1])


def test_deterministic_and_idempotent(dataset, tmp_path):
    root, paths = dataset
    stamp = {p: p.stat().st_mtime_ns for p in paths["train_images"].iterdir()}
    again = make_synthetic_coco(root, num_train=12, num_val=6, image_size=96, seed=3)
    assert again == paths
    assert {p: p.stat().st_mtime_ns for p in paths["train_images"].iterdir()} == stamp, "complete split rewritten"

    fresh = make_synthetic_coco(tmp_path, num_train=12, num_val=6, image_size=96, seed=3)
    assert fresh["train_json"].read_text() == paths["train_json"].read_text()
    first = paths["train_images"] / "000000.jpg"
    assert (fresh["train_images"] / "000000.jpg").read_bytes() == first.read_bytes()

    other = make_synthetic_coco(tmp_path / "other", num_train=12, num_val=6, image_size=96, seed=4)
    assert other["train_json"].read_text() != paths["train_json"].read_text()


def test_incomplete_split_is_regenerated(tmp_path):
    paths = make_synthetic_coco(tmp_path, num_train=4, num_val=2, image_size=64)
    (paths["val_images"] / "000001.jpg").unlink()
    make_synthetic_coco(tmp_path, num_train=4, num_val=2, image_size=64)
    assert (paths["val_images"] / "000001.jpg").is_file()
    assert not list(tmp_path.rglob("*.tmp"))
