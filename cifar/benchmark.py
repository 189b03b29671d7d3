"""Images/s of the two CIFAR augmentation paths on one CPU core (and the batched path on a GPU, if present).

    python -m cifar.benchmark [--images 20000] [--batch-size 128]

Each path runs as in training, through a single-process DataLoader (what one worker does), with one thread:
  - albumentations: per-image pad/crop/flip/normalise in __getitem__, then collate;
  - batched: the loader ships uint8 batches, BatchAugment augments and normalises them (on the CPU here: the
    worst case; on a GPU it costs the loader nothing).
The issue's bar: one core must feed >= 5,000 images/s. Reported per CPU-second of the process (robust to other
jobs on the machine) and per wall-clock second.
"""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader

from .data import CIFARImages, EpochRandomSampler
from .transforms import CIFAR10_MEAN, CIFAR10_STD, BatchAugment, train_transform


def images_per_second(images: np.ndarray, batch_size: int, path: str, device: str = "cpu") -> tuple[float, float]:
    """-> (images per wall-clock second, images per CPU second of this process)."""
    labels = np.zeros(len(images), dtype=np.int64)
    transform = train_transform(CIFAR10_MEAN, CIFAR10_STD) if path == "albumentations" else None
    dataset = CIFARImages(images, labels, transform)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=EpochRandomSampler(dataset), num_workers=0)
    augment = BatchAugment(CIFAR10_MEAN, CIFAR10_STD)
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None

    def run(limit: int | None = None) -> int:
        seen = 0
        for i, batch in enumerate(loader):
            if limit is not None and i >= limit:
                break
            if path == "batched":
                x, _, index = batch
                augment(x.to(device, non_blocking=True), index.to(device), epoch=0)
            seen += len(batch[0])
        sync()
        return seen

    run(limit=3)  # warm-up: allocator, first-call overheads
    start, start_cpu = time.perf_counter(), time.process_time()
    seen = run()
    return seen / (time.perf_counter() - start), seen / (time.process_time() - start_cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    images = np.random.default_rng(0).integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
    results = {
        "albumentations (1 core)": images_per_second(images, args.batch_size, "albumentations"),
        "batched, CPU (1 core)": images_per_second(images, args.batch_size, "batched"),
    }
    if torch.cuda.is_available():
        results["batched, GPU (1 core loading)"] = images_per_second(images, args.batch_size, "batched", "cuda")
    # CPU seconds make the figure per core even on a busy machine, where wall-clock time also counts waiting
    base = results["albumentations (1 core)"][1]
    for name, (wall, cpu) in results.items():
        print(f"{name:32s} {cpu:10,.0f} images per CPU-second ({cpu / base:.2f}x albumentations), {wall:,.0f} wall")


if __name__ == "__main__":
    main()
