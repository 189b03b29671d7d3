"""Images per second of one data-loading worker: read + decode + augment, ours against torchvision's.

    python -m places365.throughput                 # 256x256 and 512x683 JPEGs, train and eval pipelines
    python -m places365.throughput --seconds 5 --count 64

One process, one torch thread and one OpenCV thread: what a single DataLoader worker sustains. A GPU
training step of SE-ResNet-50 at batch 256 consumes on the order of 1,000-3,000 images/s, so divide by these
figures for the number of workers needed. Ours is OpenCV decoding + albumentations with uint8 output (normalised on the
device); "torchvision" is PIL decoding + torchvision.transforms as in the PyTorch ImageNet example (normalised
in the worker); "torchvision-uint8" is the same with uint8 output, the like-for-like comparison.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch

from .synthetic import write_jpeg
from .transforms import (
    build_eval_transform,
    build_train_transform,
    read_image,
    read_image_pil,
    torchvision_eval_transform,
    torchvision_train_transform,
)

SIZES = ((256, 256), (512, 683))  # data_256 / val_256, and data_large's shorter side 512 at 4:3


def make_jpegs(folder: str | Path, hw: tuple[int, int], count: int = 32, seed: int = 0) -> list[Path]:
    """`count` photo-like JPEGs (smooth structure + texture, quality 90) of size `hw` in `folder`."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    paths = []
    for i in range(count):
        h, w = hw
        coarse = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
        image = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.int16)
        image = np.clip(image + rng.integers(-20, 21, image.shape), 0, 255).astype(np.uint8)
        paths.append(folder / f"{h}x{w}_{i:04d}.jpg")
        write_jpeg(paths[-1], image)
    return paths


def pipelines(crop_size: int = 224, resize_size: int = 256) -> dict[str, tuple[Callable, Callable]]:
    """name -> (load(path), transform(image)): ours (OpenCV + albumentations, uint8 out, normalised on the
    device), torchvision's ImageNet example (PIL, normalised in the worker) and torchvision with uint8 out."""
    return {
        "ours train": (read_image, build_train_transform(crop_size)),
        "ours eval": (read_image, build_eval_transform(crop_size, resize_size)),
        "torchvision train": (read_image_pil, torchvision_train_transform(crop_size)),
        "torchvision eval": (read_image_pil, torchvision_eval_transform(crop_size, resize_size)),
        "torchvision-uint8 train": (read_image_pil, torchvision_train_transform(crop_size, uint8=True)),
        "torchvision-uint8 eval": (read_image_pil, torchvision_eval_transform(crop_size, resize_size, uint8=True)),
    }


def images_per_second(
    paths: list[Path], pipes: dict[str, tuple[Callable, Callable]], min_seconds: float = 2.0
) -> dict[str, float]:
    """Images per second of each (load, transform) pipeline over `paths`, after one warm-up pass.

    The pipelines take turns, one pass over `paths` each, until each has run `min_seconds`: a change in the
    machine's load then hits all of them alike, and their ratios stay fair.
    """
    for load, transform in pipes.values():
        for path in paths:
            transform(load(path))
    elapsed = dict.fromkeys(pipes, 0.0)
    count = dict.fromkeys(pipes, 0)
    while min(elapsed.values()) < min_seconds:
        for name, (load, transform) in pipes.items():
            start = time.perf_counter()
            for path in paths:
                out = transform(load(path))
            elapsed[name] += time.perf_counter() - start
            count[name] += len(paths)
            assert isinstance(out, torch.Tensor)
    return {name: count[name] / elapsed[name] for name in pipes}


def measure(
    sizes=SIZES, count: int = 32, min_seconds: float = 2.0, crop_size: int = 224, folder: str | Path | None = None
) -> list[dict]:
    """Rows {size, pipeline, images_per_s, vs_torchvision} for every size and pipeline, one thread."""
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for hw in sizes:
            paths = make_jpegs(Path(folder or tmp), hw, count)
            speed = images_per_second(paths, pipelines(crop_size), min_seconds)
            for name, ips in speed.items():
                theirs = speed["torchvision " + name.rsplit(" ", 1)[1]]
                rows.append({"size": f"{hw[0]}x{hw[1]}", "pipeline": name, "images_per_s": ips,
                             "vs_torchvision": ips / theirs})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="images/s of one data-loading worker")
    parser.add_argument("--count", type=int, default=32, help="distinct JPEGs per size")
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum timing per pipeline and size")
    args = parser.parse_args(argv)
    print(f"{'size':>9}  {'pipeline':<24} {'images/s':>9}  {'vs torchvision':>14}")
    for row in measure(count=args.count, min_seconds=args.seconds):
        print(f"{row['size']:>9}  {row['pipeline']:<24} {row['images_per_s']:9.0f}  {row['vs_torchvision']:14.2f}")


if __name__ == "__main__":
    main()
