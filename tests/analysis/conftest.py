"""Models trained for a few seconds, shared by the prediction, CAM and excitation tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

# Four colours; an image is noise with one 10 x 10 square of its class's colour somewhere: the evidence for the
# class sits in one place, so a class activation map has somewhere to point.
BLOB_COLOURS = np.array([[230, 40, 40], [40, 200, 60], [40, 80, 230], [230, 210, 40]], np.float32)
BLOB = 10
REPO = Path(__file__).resolve().parents[2]


def blob_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images uint8 (n, 32, 32, 3), labels (n,), square corners (n, 2) as (y, x))."""
    rng = np.random.default_rng(seed)
    images = rng.normal(128, 20, (n, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, len(BLOB_COLOURS), n)
    corners = rng.integers(0, 32 - BLOB + 1, (n, 2))
    for image, label, (y, x) in zip(images, labels, corners, strict=True):
        image[y : y + BLOB, x : x + BLOB] = BLOB_COLOURS[label]
    return np.clip(images, 0, 255).astype(np.uint8), labels, corners


BLOB_MEAN, BLOB_STD = (128 / 255,) * 3, (64 / 255,) * 3


@pytest.fixture(scope="session")
def blob_model():
    """A CIFAR SE-ResNet (one block per stage) that tells the square's colour: 40 SGD steps, about a second."""
    from backbones import create_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model("cifar_se_resnet110", depth_per_stage=1, num_classes=len(BLOB_COLOURS))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(40):
        images, labels, _ = blob_images(32, seed=100 + step)
        x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - BLOB_MEAN[0]) / BLOB_STD[0]
        loss = torch.nn.functional.cross_entropy(model(x), torch.from_numpy(labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="session")
def cifar_checkpoint(tmp_path_factory):
    """The CIFAR smoke run (configs/lightning/smoke/cifar10_synthetic.yaml) through the trainer's CLI, cut to 200
    steps at a constant lr without augmentation: a real Lightning last.ckpt whose model knows the synthetic
    classes (~9% validation error), in about 15 s on one thread."""
    from cifar.data import CIFARDataModule
    from classification.cli import run_cli

    root = tmp_path_factory.mktemp("cifar_smoke")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run_cli(
        CIFARDataModule,
        args=[
            "fit",
            "--config",
            str(REPO / "configs/lightning/smoke/cifar10_synthetic.yaml"),
            f"--trainer.default_root_dir={root}",
            "--trainer.max_steps=200",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.logger=false",
            "--data.synthetic_train=2560",
            "--data.synthetic_val=200",
            "--data.augment=none",
            "--model.schedule=constant",
            "--model.warmup=10",
        ],
    )
    torch.set_num_threads(threads)
    return root / "checkpoints" / "last.ckpt"
