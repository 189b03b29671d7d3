"""Detection demo for both engines: images in, the images with boxes, class names and scores drawn out.

What detectron2's demo/demo.py and MMDetection's DetInferencer do, for the detectors trained here: the model
is built and loaded as each engine's training loaded it (detectron2 through `SENetCheckpointer`, which refuses a
partial backbone; MMDetection through `DetInferencer`, with MMEngine's checkpoints allowed weights-only), and
each engine's own drawing is used (detectron2's `Visualizer`, MMDetection's `DetLocalVisualizer`).
tools/demo_detection.py is the command line.

Images smaller than `min_size` are drawn enlarged, so that labels stay legible on the synthetic 128 px images.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

ENGINES = ("detectron2", "mmdet")


@dataclass
class Detections:
    """Boxes (N, 4) x0, y0, x1, y1 in image pixels, scores (N,), contiguous class indices (N,)."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def above(self, threshold: float) -> Detections:
        keep = self.scores >= threshold
        return Detections(self.boxes[keep], self.scores[keep], self.labels[keep])

    def scaled(self, factor: float) -> Detections:
        return Detections(self.boxes * factor, self.scores, self.labels)


def draw_detectron2(image: np.ndarray, detections: Detections, class_names: Sequence[str]) -> np.ndarray:
    """detectron2's Visualizer: (H, W, 3) uint8 RGB -> the same with boxes and "name score%" labels."""
    from detectron2.data.catalog import Metadata
    from detectron2.structures import Boxes, Instances
    from detectron2.utils.visualizer import Visualizer

    instances = Instances(
        image.shape[:2],
        pred_boxes=Boxes(torch.as_tensor(detections.boxes, dtype=torch.float32).reshape(-1, 4)),
        scores=torch.as_tensor(detections.scores, dtype=torch.float32),
        pred_classes=torch.as_tensor(detections.labels, dtype=torch.int64),
    )
    visualizer = Visualizer(image, Metadata(name="senet_demo", thing_classes=list(class_names)))
    return visualizer.draw_instance_predictions(instances).get_image()


def draw_mmdet(image: np.ndarray, detections: Detections, class_names: Sequence[str], visualizer=None) -> np.ndarray:
    """MMDetection's DetLocalVisualizer: (H, W, 3) uint8 RGB -> the same with boxes and "name: score" labels."""
    from mmdet.structures import DetDataSample
    from mmdet.visualization import DetLocalVisualizer
    from mmengine.structures import InstanceData

    if visualizer is None:
        visualizer = DetLocalVisualizer.get_instance("senet_demo")
        # one colour per class, as DetInferencer's default palette ("none" keeps the config's, here none)
        visualizer.dataset_meta = {"classes": tuple(class_names), "palette": "random"}
    sample = DetDataSample()
    sample.pred_instances = InstanceData(
        bboxes=torch.as_tensor(detections.boxes, dtype=torch.float32).reshape(-1, 4),
        scores=torch.as_tensor(detections.scores, dtype=torch.float32),
        labels=torch.as_tensor(detections.labels, dtype=torch.int64),
    )
    visualizer.add_datasample("demo", image, sample, draw_gt=False, show=False, pred_score_thr=0.0)
    return visualizer.get_image()


class Detectron2Detector:
    """A detectron2 config and its weights: (H, W, 3) uint8 RGB -> Detections. `opts`: KEY VALUE overrides."""

    engine = "detectron2"

    def __init__(self, config: str | os.PathLike, weights: str, *, device: str = "cpu", opts: Sequence[str] = ()):
        from detectron2.data import MetadataCatalog
        from detectron2.engine import DefaultPredictor

        from .detectron2.checkpoint import SENetCheckpointer, check_weights_file
        from .detectron2.engine import get_config

        check_weights_file(weights)
        cfg = get_config(config, [*opts, "MODEL.DEVICE", device, "MODEL.WEIGHTS", ""])
        # DefaultPredictor's preprocessing (test resize, INPUT.FORMAT); the weights through SENetCheckpointer,
        # which loads every format training does and refuses a partial backbone
        self.predictor = DefaultPredictor(cfg)
        SENetCheckpointer(self.predictor.model).load(weights)
        meta = MetadataCatalog.get(cfg.DATASETS.TEST[0]) if cfg.DATASETS.TEST else None
        classes = getattr(meta, "thing_classes", None) or []
        self.class_names = list(classes) or [str(i) for i in range(cfg.MODEL.ROI_HEADS.NUM_CLASSES)]

    def __call__(self, image: np.ndarray) -> Detections:
        instances = self.predictor(np.ascontiguousarray(image[..., ::-1]))["instances"].to("cpu")  # takes BGR
        return Detections(instances.pred_boxes.tensor.numpy(), instances.scores.numpy(), instances.pred_classes.numpy())

    def draw(self, image: np.ndarray, detections: Detections) -> np.ndarray:
        return draw_detectron2(image, detections, self.class_names)


class MMDetDetector:
    """An MMDetection config and its weights through DetInferencer: (H, W, 3) uint8 RGB -> Detections.
    `cfg_options`: overrides as `--cfg-options` takes them ({"model.test_cfg.rcnn.score_thr": 0.3})."""

    engine = "mmdet"

    def __init__(
        self, config: str | os.PathLike, weights: str, *, device: str = "cpu", cfg_options: dict | None = None
    ):
        from mmdet.apis import DetInferencer

        from .mmdet.runner import allow_mmengine_checkpoints, check_mmdet, load_config

        check_mmdet()
        allow_mmengine_checkpoints()  # the checkpoints tools/train_mmdet.py writes, loaded weights-only
        if not Path(weights).is_file():
            raise FileNotFoundError(f"{weights}: no such detector checkpoint")
        cfg = load_config(config, cfg_options=cfg_options)
        self.inferencer = DetInferencer(model=cfg, weights=weights, device=device, show_progress=False)
        self.class_names = list(self.inferencer.model.dataset_meta.get("classes", ()))

    def __call__(self, image: np.ndarray) -> Detections:
        result = self.inferencer(np.ascontiguousarray(image[..., ::-1]), return_datasamples=True)  # takes BGR
        pred = result["predictions"][0].pred_instances.cpu()
        return Detections(pred.bboxes.numpy(), pred.scores.numpy(), pred.labels.numpy())

    def draw(self, image: np.ndarray, detections: Detections) -> np.ndarray:
        return draw_mmdet(image, detections, self.class_names, self.inferencer.visualizer)


def build_detector(engine: str, config: str | os.PathLike, weights: str, *, device: str = "cpu", options=()):
    """The engine's detector; `options` are detectron2's KEY VALUE list or MMDetection's "key=value" items."""
    if engine == "detectron2":
        return Detectron2Detector(config, weights, device=device, opts=list(options))
    if engine == "mmdet":
        from .mmdet.runner import parse_cfg_options

        return MMDetDetector(config, weights, device=device, cfg_options=parse_cfg_options(list(options)))
    raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")


def render(detector, image: np.ndarray, detections: Detections, min_size: int = 384) -> np.ndarray:
    """The engine's drawing of `detections` on `image`, enlarged first when its longer side is below `min_size`."""
    factor = max(1.0, min_size / max(image.shape[:2]))
    if factor > 1:
        size = (round(image.shape[1] * factor), round(image.shape[0] * factor))
        image, detections = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR), detections.scaled(factor)
    return detector.draw(image, detections)


def run_demo(
    detector,
    images: Iterable[tuple[str, np.ndarray]],
    out: str | os.PathLike,
    *,
    score_threshold: float = 0.5,
    min_size: int = 384,
) -> list[tuple[str, str, Detections]]:
    """Detect, draw and write every (name, RGB image): `<out>/<stem>.png`, or `out` itself when it names a
    .png and there is one image. Returns (image, written file, detections above the threshold)."""
    from classification.cam import write_png

    images = list(images)
    out = Path(out)
    single = out.suffix.lower() == ".png"
    if single and len(images) != 1:
        raise ValueError(f"--out {out} names one file, but {len(images)} images were given")
    results = []
    for name, image in images:
        detections = detector(image).above(score_threshold)
        target = out if single else out / f"{Path(name).stem}.png"
        write_png(target, render(detector, image, detections, min_size))
        results.append((name, str(target), detections))
    return results


def synthetic_images(count: int) -> list[Path]:
    """The first `count` images of the synthetic val split both smoke runs evaluate on (generated if missing)."""
    from .synthetic import SMOKE_OPTIONS, make_synthetic_coco

    root = Path(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))) / "synthetic_coco"
    folder = make_synthetic_coco(root, **SMOKE_OPTIONS)["val_images"]
    return sorted(folder.glob("*.jpg"))[:count]


def parse_args(argv: list[str] | None = None):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=ENGINES, required=True)
    parser.add_argument("config", help="the detector's config (a detectron2 YAML or an MMDetection .py)")
    parser.add_argument("weights", help="the trained detector (detectron2 model_final.pth, mmdet iter_N.pth)")
    parser.add_argument("images", nargs="*", help="image files, folders, list files; default: synthetic val images")
    parser.add_argument("--count", type=int, default=4, help="synthetic val images drawn when none are given")
    parser.add_argument("--out", default="output/demo_detection", help="folder, or a .png for one image")
    parser.add_argument("--score-threshold", type=float, default=0.5)
    parser.add_argument("--min-size", type=int, default=384, help="draw smaller images enlarged to this size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--opts", nargs="*", default=[], help="config overrides: detectron2 KEY VALUE pairs, mmdet key=value items"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[tuple[str, str, Detections]]:
    import sys

    from rich.console import Console
    from rich.table import Table

    from backbones import CheckpointError
    from classification.inference import image_paths, read_images
    from classification.samples import DataError

    args = parse_args(argv)
    try:
        paths = list(image_paths(args.images)) if args.images else synthetic_images(args.count)
        detector = build_detector(args.engine, args.config, args.weights, device=args.device, options=args.opts)
        results = run_demo(
            detector, read_images(paths), args.out, score_threshold=args.score_threshold, min_size=args.min_size
        )
    except (DataError, CheckpointError, OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    table = Table(title=f"{args.engine}: {Path(args.weights).name}, score >= {args.score_threshold}")
    for column in ("image", "written", "detections: class score box (x0 y0 x1 y1)"):
        table.add_column(column, overflow="fold")
    for name, target, d in results:
        found = [
            f"{detector.class_names[int(c)]} {s:.2f} ({' '.join(f'{v:.0f}' for v in b)})"
            for b, s, c in zip(d.boxes, d.scores, d.labels, strict=True)
        ]
        table.add_row(Path(name).name, target, "\n".join(found) or "-")
    Console().print(table)
    return results
