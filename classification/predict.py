"""Classify images with a trained checkpoint: top-k classes by name, the Places365 indoor/outdoor vote, CAMs.

What the Places365 release's run_placesCNN_basic.py / _unified.py do, for every classifier of this suite and
with the training's own preprocessing (`classification.inference`). tools/predict.py is the command line:

    python tools/predict.py output/smoke/places365_synthetic/checkpoints/last.ckpt IMAGE_OR_FOLDER_OR_LIST \
        --io IO_places365.txt --cam output/cam --csv predictions.csv
    python tools/predict.py output/smoke/cifar10_synthetic/checkpoints/last.ckpt   # 8 images of its val set

The indoor/outdoor vote follows the release: the IO file gives every class 1 (indoor) or 2 (outdoor), one
`<category> <1|2>` line per class in class order; an image is indoor when the mean label of its 10 most likely
classes is below 1.5.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from backbones import CheckpointError
from backbones.fileio.atomic import atomic_write

from .cam import class_activation_maps, features_and_logits, overlay, write_png
from .inference import Classifier, image_paths, load_classifier, read_images, run_name, validation_samples
from .samples import DataError

IO_TOP = 10  # the release votes over the 10 most likely classes


@dataclass
class Prediction:
    """One image's result: `top` [(class index, name, probability)], most likely first; `label` its true class
    when known; `io_mean` the mean IO label of its top-10 classes and `environment` "indoor" / "outdoor"."""

    image: str
    top: list[tuple[int, str, float]]
    label: int | None = None
    io_mean: float | None = None
    environment: str | None = None
    cam: str | None = None
    extra: dict = field(default_factory=dict)


def read_io_labels(path: str | Path, class_names: list[str] | None = None) -> np.ndarray:
    """The release's IO_places365.txt: `<category> <1|2>` per class, in class order -> (K,) int array.

    With `class_names` the count must match, and so must each line's category where the names are real ones:
    the line's name is the class name, or ends in `/<class name>` (`/a/airfield` for the DataModule's `airfield`).
    """
    labels, names = [], []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 2 or fields[-1] not in ("1", "2"):
            raise DataError(f"{path} line {lineno}: expected '<category> <1|2>' (1 indoor, 2 outdoor), got {line!r}")
        labels.append(int(fields[-1]))
        names.append(fields[0])
    if class_names is not None:
        if len(labels) != len(class_names):
            raise DataError(f"{path}: {len(labels)} classes, the model has {len(class_names)}")
        wrong = [(i, a, b) for i, (a, b) in enumerate(zip(names, class_names, strict=True)) if not _same(a, b)]
        if wrong and not class_names[0].startswith("class_"):
            i, a, b = wrong[0]
            # the line's name in the model's form: as many trailing path parts as the class name has
            shown = a if b.startswith("/") else "/".join(a.split("/")[-1 - b.count("/") :])
            raise DataError(f"{path}: class {i} is {shown!r} there but {b!r} in the model's categories")
    return np.asarray(labels)


def _same(written: str, name: str) -> bool:
    """A category as a file writes it (`/a/apartment_building/outdoor`) names class `name`
    (`apartment_building/outdoor`, or the same path)."""
    return written == name or written.endswith(f"/{name}")


def io_vote(probabilities: np.ndarray, io_labels: np.ndarray) -> tuple[float, str]:
    """(mean IO label of the 10 most likely classes, "indoor" if it is below 1.5 else "outdoor")."""
    top = np.argsort(-probabilities, kind="stable")[:IO_TOP]
    mean = float(io_labels[top].mean())
    return mean, "indoor" if mean < 1.5 else "outdoor"


@torch.no_grad()
def predict(
    classifier: Classifier,
    images: Iterable[tuple[str, np.ndarray, int | None]],
    *,
    top_k: int = 5,
    io_labels: np.ndarray | None = None,
    cam_dir: str | Path | None = None,
    batch_size: int = 32,
) -> list[Prediction]:
    """Predict every (name, (H, W, 3) uint8 RGB, label or None) image; with `cam_dir`, write the CAM of each
    image's top class over the crop the network saw, as `<cam_dir>/<NNN>_<name>.png` (or as `cam_dir` itself
    when it names a .png and there is one image)."""
    images = list(images)
    if cam_dir is not None and str(cam_dir).lower().endswith(".png") and len(images) != 1:
        raise DataError(f"--cam {cam_dir} names one file, but there are {len(images)} images")
    results: list[Prediction] = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        results += _predict_batch(classifier, batch, top_k, io_labels, cam_dir, start)
    return results


def _predict_batch(classifier, batch, top_k, io_labels, cam_dir, offset) -> list[Prediction]:
    model, pre = classifier.model, classifier.preprocessing
    device = next(model.parameters()).device
    crops = [pre.crop(image) for _, image, _ in batch]
    x = torch.stack([pre.tensor(c) for c in crops]).to(device)
    features, logits = features_and_logits(model, x)
    probs = logits.float().softmax(1)
    p, idx = probs.topk(min(top_k, probs.shape[1]), dim=1)
    cams = None
    if cam_dir is not None:
        if features is None:
            raise TypeError(f"{type(model).__name__} has no forward_features: no class activation map")
        cams = class_activation_maps(model, features, idx[:, 0]).float().cpu().numpy()
    out = []
    for i, (name, _, label) in enumerate(batch):
        top = [(int(c), classifier.class_names[int(c)], float(q)) for q, c in zip(p[i], idx[i], strict=True)]
        pred = Prediction(name, top, label)
        if io_labels is not None:
            pred.io_mean, pred.environment = io_vote(probs[i].cpu().numpy(), io_labels)
        if cams is not None:
            stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name).stem).strip("_")
            single = str(cam_dir).lower().endswith(".png")
            pred.cam = str(cam_dir) if single else str(Path(cam_dir) / f"{offset + i:03d}_{stem}.png")
            write_png(pred.cam, overlay(crops[i], cams[i]))
        out.append(pred)
    return out


def table(predictions: list[Prediction], class_names: list[str], title: str = ""):
    """A rich Table: image, true label (when known), one column per rank ("name / p"), the IO vote (when asked).

    The top-1 is green when it is the known label, red when not.
    """
    from rich.table import Table

    t = Table(title=title or None, show_lines=True)
    t.add_column("image", overflow="fold")
    labelled = any(p.label is not None for p in predictions)
    if labelled:
        t.add_column("label", overflow="fold")
    for rank in range(1, max(len(p.top) for p in predictions) + 1):
        t.add_column(f"top-{rank}" if rank == 1 else str(rank), overflow="fold")
    if any(p.environment for p in predictions):
        t.add_column("indoor/outdoor")
    shown = _short_paths([p.image for p in predictions])
    for p, image in zip(predictions, shown, strict=True):
        cells = [f"{name}\n{prob:.3f}" for _, name, prob in p.top]
        if p.label is not None:
            cells[0] = f"[{'green' if p.label == p.top[0][0] else 'red'}]{cells[0]}[/]"
        row = [image, *([class_names[p.label] if p.label is not None else ""] if labelled else []), *cells]
        if p.environment:
            row.append(f"{p.environment}\n{p.io_mean:.2f}")
        t.add_row(*row)
    return t


def _short_paths(images: list[str]) -> list[str]:
    """The file names when they tell the images apart, else the paths (the table's column stays narrow)."""
    names = [os.path.basename(i) for i in images]
    return names if len(set(names)) == len(names) else images


def write_csv(path: str | Path, predictions: list[Prediction]) -> None:
    """One row per image and rank: image, rank, index, name, probability, label, io_mean, environment."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["image", "rank", "index", "name", "probability", "label", "io_mean", "environment"])
    for p in predictions:
        for rank, (index, name, prob) in enumerate(p.top, start=1):
            writer.writerow([p.image, rank, index, name, f"{prob:.6f}", p.label, p.io_mean, p.environment])
    _write_text(path, out.getvalue())


def write_json(path: str | Path, predictions: list[Prediction]) -> None:
    rows = []
    for p in predictions:
        row = {k: v for k, v in asdict(p).items() if v not in (None, {})}
        row["top"] = [{"index": i, "name": n, "probability": q} for i, n, q in p.top]
        rows.append(row)
    _write_text(path, json.dumps(rows, indent=2) + "\n")


def _write_text(path: str | Path, text: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a trainer's Lightning .ckpt, or any checkpoint backbones loads")
    parser.add_argument("images", nargs="*", help="image files, folders, list files (one path per line)")
    parser.add_argument(
        "--val",
        type=int,
        metavar="N",
        help="also N images of the run's validation set, with "
        "their labels (the default, N=8, when no images are given)",
    )
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--io", metavar="FILE", help="IO_places365.txt: add the indoor/outdoor vote")
    parser.add_argument(
        "--cam",
        metavar="DIR",
        help="write the class activation map of each top class here (or into DIR.png for one image)",
    )
    parser.add_argument("--csv", metavar="FILE", help="write the predictions as CSV")
    parser.add_argument("--json", metavar="FILE", help="write the predictions as JSON")
    parser.add_argument("--labels", metavar="FILE", help="class names, one per line (or '<name> <index>' lines)")
    parser.add_argument("--model", help="registry name, for a checkpoint that does not record it")
    parser.add_argument("--trusted", action="store_true", help="open a pickle that runs code (trusted files only)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Prediction]:
    args = parse_args(argv)
    try:
        classifier = load_classifier(
            args.checkpoint, model=args.model, labels=args.labels, trusted=args.trusted, device=args.device
        )
        io_labels = read_io_labels(args.io, classifier.class_names) if args.io else None
        images = [(name, image, None) for name, image in read_images(image_paths(args.images))]
        count = args.val if args.val is not None else 0 if images else 8
        images += validation_samples(classifier, count) if count else []
        predictions = predict(
            classifier, images, top_k=args.top_k, io_labels=io_labels, cam_dir=args.cam, batch_size=args.batch_size
        )
    except (DataError, CheckpointError, OSError, TypeError) as e:
        sys.exit(f"error: {e}")
    from rich.console import Console

    console = Console()
    console.print(table(predictions, classifier.class_names, title=run_name(args.checkpoint)))
    known = [p for p in predictions if p.label is not None]
    if known:
        right = sum(p.top[0][0] == p.label for p in known)
        console.print(f"top-1 correct on the labelled images: {right}/{len(known)}")
    if args.cam:
        where = args.cam if args.cam.lower().endswith(".png") else f"{args.cam}/"
        console.print(f"class activation maps: {where}")
    for path, writer in ((args.csv, write_csv), (args.json, write_json)):
        if path:
            writer(path, predictions)
            console.print(f"wrote {path}")
    return predictions
