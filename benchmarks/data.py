"""Data pipelines: images/s of one worker (one thread) for our pipelines against torchvision-transform ones.

CIFAR: a batch of in-memory uint8 images through the training augmentation (pad 4, random 32x32 crop, flip,
normalise) and the collate step, three ways: our albumentations path (`cifar.transforms.train_transform`, per
image in the workers), our batched path (`cifar.transforms.BatchAugment`, the worker only slices and collates
uint8, the batch is augmented at once), and torchvision's classic `RandomCrop(32, padding=4)` pipeline on PIL
images (what `torchvision.datasets.CIFAR10` feeds it).

Places365: generated JPEGs on disk, read + decoded + random-resized-cropped to 224 + flipped + normalised:
ours (`classification.transforms`: OpenCV decode, albumentations) against torchvision's (PIL decode,
`classification.transforms.torchvision_train_transform`), on the same files.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import default_collate

from .models import Settings
from .report import Figure, Row, Section, ratio_figure
from .timing import CLOCKS, Spread, interleave

CIFAR_TARGET = 5000.0  # images/s per core the issue asks of our CIFAR pipeline
CIFAR_BATCH = 256
PLACES_SIZE = (512, 683)  # the high-resolution Places365 images: shorter side 512
PLACES_IMAGES = 48
PLACES_TARGET = 1.0  # our decode + augment time / torchvision's, at most


@contextlib.contextmanager
def one_worker_threads() -> Iterator[None]:
    """As inside a DataLoader worker: one torch thread and one OpenCV thread; restored afterwards."""
    import cv2

    torch_threads, cv2_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        torch.set_num_threads(torch_threads)
        cv2.setNumThreads(cv2_threads)


def _time(fns: dict[str, Callable[[], object]], settings: Settings) -> dict[str, list[float]]:
    with one_worker_threads():
        return interleave(fns, repeats=settings.repeats, warmup=max(1, settings.warmup), clock=CLOCKS[settings.clock])


def cifar_section(settings: Settings, scale: float, log: Callable[[str], None] = print) -> Section:
    section = Section("Data: CIFAR augmentation + collate, one worker (1 thread)")
    try:
        from PIL import Image
        from torchvision import transforms as T

        from cifar.transforms import CIFAR10_MEAN, CIFAR10_STD, BatchAugment, train_transform
    except ImportError as err:
        section.skipped = f"the CIFAR pipeline or torchvision cannot be imported ({err})"
        return section

    n = max(8, int(CIFAR_BATCH * 4 * scale))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = torch.from_numpy(rng.integers(0, 10, n))
    chw = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    ours = train_transform(CIFAR10_MEAN, CIFAR10_STD)
    batched = BatchAugment(CIFAR10_MEAN, CIFAR10_STD)
    theirs = T.Compose(
        [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
    )
    batch = min(CIFAR_BATCH, n)

    def batches(item: Callable[[int], tuple]) -> None:
        for start in range(0, n, batch):
            default_collate([item(i) for i in range(start, min(n, start + batch))])

    def albumentations_path():
        batches(lambda i: (ours(image=images[i])["image"], labels[i]))

    def batched_path():
        for start in range(0, n, batch):
            idx = torch.arange(start, min(n, start + batch))
            images_u8, _, index = default_collate([(chw[i], labels[i], i) for i in idx.tolist()])
            batched(images_u8, index, epoch=0)

    def torchvision_path():
        batches(lambda i: (theirs(Image.fromarray(images[i])), labels[i]))

    fns = {"ours albumentations": albumentations_path, "ours batched": batched_path, "torchvision": torchvision_path}
    log(f"timing CIFAR pipelines: {n} images x {settings.repeats} rounds")
    times = _time(fns, settings)
    section.rows = [Row(name, Spread.of(t), n) for name, t in times.items()]
    for key, name in (("albumentations", "ours albumentations"), ("batched", "ours batched")):
        rate = Spread.of([n / t for t in times[name]])
        what = f"CIFAR {name}, images/s per core"
        section.figures.append(Figure(f"data_cifar_{key}_images_per_s", what, rate, CIFAR_TARGET, at_least=True))
        what = f"CIFAR {name} / torchvision"
        section.figures.append(
            ratio_figure(f"data_cifar_{key}_vs_torchvision", what, times[name], times["torchvision"])
        )
    return section


def _write_jpegs(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    """`count` JPEGs (quality 90) of smooth colour fields with noise: photo-like sizes on disk."""
    import cv2

    rng = np.random.default_rng(0)
    h, w = size
    paths = []
    for i in range(count):
        low = rng.uniform(0, 255, (h // 32 + 1, w // 32 + 1, 3)).astype(np.float32)
        image = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC) + rng.normal(0, 10, (h, w, 3))
        path = folder / f"{i:05d}.jpg"
        ok, buf = cv2.imencode(".jpg", np.clip(image, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])
        if not ok:
            raise RuntimeError(f"could not encode {path}")
        path.write_bytes(buf.tobytes())
        paths.append(path)
    return paths


def places365_section(settings: Settings, scale: float, log: Callable[[str], None] = print) -> Section:
    section = Section("Data: Places365 read + decode + augment (RandomResizedCrop 224, flip), one worker (1 thread)")
    try:
        from classification.transforms import (
            build_train_transform,
            read_image,
            read_image_pil,
            torchvision_train_transform,
        )

        ours, theirs = build_train_transform(224), torchvision_train_transform(224)
    except ImportError as err:
        section.skipped = f"the Places365 pipeline or torchvision cannot be imported ({err})"
        return section

    count = max(4, int(PLACES_IMAGES * scale))
    with tempfile.TemporaryDirectory(prefix="bench_places365_") as tmp:
        paths = _write_jpegs(Path(tmp), count, PLACES_SIZE)

        def ours_path():
            for p in paths:
                ours(read_image(p))

        def torchvision_path():
            for p in paths:
                theirs(read_image_pil(p))

        log(
            f"timing Places365 pipelines: {count} JPEGs of {PLACES_SIZE[1]}x{PLACES_SIZE[0]}, {settings.repeats} rounds"
        )
        times = _time({"ours (OpenCV + albumentations)": ours_path, "torchvision (PIL)": torchvision_path}, settings)
    section.rows = [Row(name, Spread.of(t), count) for name, t in times.items()]
    ours_t, theirs_t = times.values()
    what = "Places365 ours / torchvision"
    section.figures.append(ratio_figure("data_places365_vs_torchvision", what, ours_t, theirs_t, PLACES_TARGET))
    return section


def run_data(settings: Settings, scale: float = 1.0, log: Callable[[str], None] = print) -> list[Section]:
    """Both data sections; `scale` shrinks the number of images (quick and self-test presets)."""
    return [cifar_section(settings, scale, log), places365_section(settings, scale, log)]
