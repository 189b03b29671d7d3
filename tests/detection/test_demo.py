"""tools/demo_detection.py: each engine's drawing puts the boxes where the objects are, and the demo runs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from detection.demo import Detections, draw_detectron2, draw_mmdet, main, run_demo
from detection.synthetic import SYNTHETIC_CLASSES, make_synthetic_coco

REPO = Path(__file__).resolve().parents[2]
D2_SMOKE = REPO / "configs/detectron2/smoke/faster_rcnn_se_r50_synthetic.yaml"
MM_SMOKE = REPO / "configs/mmdet/smoke/faster-rcnn_se-r50_fpn_synthetic.py"


def _has_mmdet() -> bool:
    from detection.mmdet.runner import MMDetUnavailable, check_mmdet

    try:
        check_mmdet()
    except MMDetUnavailable:
        return False
    return True


def _engine(name: str):
    if name == "detectron2":
        pytest.importorskip("detectron2", reason="Detectron2 is not installed")
        return draw_detectron2
    if not _has_mmdet():
        pytest.skip("MMDetection is not installed")
    return draw_mmdet


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A synthetic val image with its ground truth: (path, RGB image, boxes x0 y0 x1 y1, contiguous labels)."""
    paths = make_synthetic_coco(tmp_path_factory.mktemp("coco"), num_train=1, num_val=3, image_size=192, seed=3)
    data = json.loads(paths["val_json"].read_text())
    ids = [c["id"] for c in data["categories"]]
    # the image with the most objects
    image = max(data["images"], key=lambda im: sum(a["image_id"] == im["id"] for a in data["annotations"]))
    anns = [a for a in data["annotations"] if a["image_id"] == image["id"]]
    boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], np.float32)
    labels = np.array([ids.index(a["category_id"]) for a in anns])
    path = paths["val_images"] / image["file_name"]
    return path, cv2.imread(str(path))[..., ::-1].copy(), boxes, labels


def _changed(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    return np.abs(before.astype(int) - after.astype(int)).max(2) > 24


def _check_drawn_at(before: np.ndarray, after: np.ndarray, boxes: np.ndarray) -> None:
    """Every box's outline is drawn (along each edge, nearly every position has a changed pixel within 2 px of
    it, whatever the line width); pixels far from every box and its label are unchanged."""
    assert after.shape == before.shape
    changed = _changed(before, after)
    for x0, y0, x1, y1 in np.round(boxes).astype(int):
        edges = {
            "top": changed[max(y0 - 2, 0) : y0 + 3, x0 + 3 : x1 - 2].any(0),
            "bottom": changed[y1 - 2 : y1 + 3, x0 + 3 : x1 - 2].any(0),
            "left": changed[y0 + 3 : y1 - 2, max(x0 - 2, 0) : x0 + 3].any(1),
            "right": changed[y0 + 3 : y1 - 2, x1 - 2 : x1 + 3].any(1),
        }
        for edge, drawn in edges.items():
            assert drawn.mean() > 0.6, f"the {edge} edge of box {(x0, y0, x1, y1)} is not drawn"
    near = np.zeros_like(changed)
    for x0, y0, x1, y1 in np.round(boxes).astype(int):
        near[max(y0 - 30, 0) : y1 + 6, max(x0 - 6, 0) : x1 + 80] = True  # the box, its label above or beside it
    assert near.any() and not near.all()
    assert changed[~near].mean() < 0.01


@pytest.mark.parametrize("engine", ["detectron2", "mmdet"])
def test_boxes_are_drawn_where_the_objects_are(engine, synthetic):
    draw = _engine(engine)
    _, image, boxes, labels = synthetic
    drawn = draw(image, Detections(boxes, np.full(len(boxes), 0.9), labels), SYNTHETIC_CLASSES)
    _check_drawn_at(image, drawn, boxes)
    mirrored = boxes[:, [2, 1, 0, 3]] * [-1, 1, -1, 1] + [image.shape[1], 0, image.shape[1], 0]
    elsewhere = draw(image, Detections(mirrored, np.full(len(boxes), 0.9), labels), SYNTHETIC_CLASSES)
    with pytest.raises(AssertionError):  # the check tells boxes drawn elsewhere apart
        _check_drawn_at(image, elsewhere, boxes)


class InjectedDetector:
    """The ground truth as predictions, plus a low-score box elsewhere that the threshold must drop."""

    def __init__(self, draw, boxes, labels):
        self.draw_fn, self.boxes, self.labels = draw, boxes, labels
        self.class_names = list(SYNTHETIC_CLASSES)

    def __call__(self, image):
        boxes = np.concatenate([self.boxes, [[1, 1, 20, 20]]]).astype(np.float32)
        return Detections(boxes, np.array([0.9] * len(self.boxes) + [0.2]), np.append(self.labels, 0))

    def draw(self, image, detections):
        return self.draw_fn(image, detections, self.class_names)


@pytest.mark.parametrize("engine", ["detectron2", "mmdet"])
def test_demo_writes_enlarged_pictures_of_what_passes_the_threshold(engine, synthetic, tmp_path):
    draw = _engine(engine)
    path, image, boxes, labels = synthetic
    ((name, written, found),) = run_demo(
        InjectedDetector(draw, boxes, labels), [(str(path), image)], tmp_path, score_threshold=0.5, min_size=384
    )
    assert Path(written) == tmp_path / f"{path.stem}.png" and len(found.scores) == len(boxes)
    picture = cv2.imread(written)[..., ::-1]
    enlarged = cv2.resize(image, (384, 384), interpolation=cv2.INTER_LINEAR)
    _check_drawn_at(enlarged, picture, boxes * 2)  # 192 px drawn at 384


@pytest.mark.parametrize("engine", ["detectron2", "mmdet"])
def test_command_line_with_each_engine(engine, synthetic, tmp_path, one_thread):
    """The real engines end to end on a smaller, untrained detector: build, load the weights file, predict, draw."""
    _engine(engine)
    path, image, _, _ = synthetic
    weights = tmp_path / "weights.pth"
    if engine == "detectron2":
        from detection.detectron2.engine import build_model_from_config

        options = ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"]
        torch.save({"model": build_model_from_config(D2_SMOKE, options).state_dict()}, weights)
        config = D2_SMOKE
    else:
        from mmdet.apis import DetInferencer

        from detection.mmdet.runner import load_config, parse_cfg_options

        options = ["model.backbone.stage_blocks=(1,1,1,1)", "model.backbone.init_cfg=None"]
        cfg = load_config(MM_SMOKE, cfg_options=parse_cfg_options(options))
        torch.save(
            {"state_dict": DetInferencer(model=cfg, device="cpu", show_progress=False).model.state_dict()}, weights
        )
        config = MM_SMOKE
    out = tmp_path / "one.png"
    args = ["--engine", engine, str(config), str(weights), str(path), "--out", str(out), "--score-threshold", "0"]
    ((name, written, found),) = main([*args, "--device", "cpu", "--opts", *options])
    assert written == str(out) and cv2.imread(written).shape == (384, 384, 3)
    assert found.boxes.shape == (len(found.scores), 4) and set(found.labels.tolist()) <= set(range(4))
    assert ((found.boxes >= -1) & (found.boxes <= 193)).all()  # in the 192 px image's coordinates
