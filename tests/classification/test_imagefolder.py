"""The image-file pipeline Places365 and ImageNet share (classification.transforms, .samples, .loaders), and
top-5 and ten-crop errors of ClassificationModule against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from classification.loaders import seed_worker
from classification.module import ClassificationModule
from classification.samples import ImageSampleDataset, SampleTable
from classification.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_eval_transform,
    build_train_transform,
    normalize,
    ten_crops,
)

CROP = 32  # small crops keep the tests fast; the pipeline is the same at 224


def test_eval_transform_is_resize_and_centre_crop():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)  # shorter side already 256: no resize
    out = build_eval_transform(224, 256)(image)
    assert torch.equal(out, torch.from_numpy(image[16:240, 48:272].transpose(2, 0, 1).copy()))
    large = build_eval_transform(224, 256)(rng.integers(0, 256, (512, 683, 3), dtype=np.uint8))
    assert large.shape == (3, 224, 224) and large.dtype == torch.uint8


def test_normalize_on_device_matches_torchvision():
    from torchvision.transforms.functional import normalize as tv_normalize

    images = torch.randint(0, 256, (2, 10, 3, 8, 8), dtype=torch.uint8)  # ten-crop batch
    expected = tv_normalize(images.float() / 255, IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(normalize(images), expected, atol=1e-5, rtol=1e-5)


def test_ten_crops_are_corners_centre_and_mirrors():
    image = np.arange(6 * 8 * 1, dtype=np.float32).reshape(6, 8, 1)
    crops = ten_crops(image, 4)
    expected = [image[:4, :4], image[:4, 4:], image[2:, :4], image[2:, 4:], image[1:5, 2:6]]
    for i, crop in enumerate(expected):
        np.testing.assert_array_equal(crops[i], crop)
        np.testing.assert_array_equal(crops[i + 5], crop[:, ::-1])
    out = build_eval_transform(CROP, 37, ten_crop=True)(np.zeros((256, 300, 3), np.uint8))
    assert out.shape == (10, 3, CROP, CROP)


def test_train_transform_and_worker_streams_differ(tmp_path):
    """Random-resized crops + flips; each DataLoader worker draws its own crops (not the parent's stream)."""
    path = tmp_path / "x.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(path)
    table = SampleTable(tmp_path, ["x.jpg"] * 4, [0] * 4, "test")
    dataset = ImageSampleDataset(table, build_train_transform(CROP))
    assert dataset[0][0].shape == (3, CROP, CROP)
    loader = DataLoader(dataset, batch_size=1, num_workers=2, worker_init_fn=seed_worker)
    crops = [images[0] for images, _ in loader]  # worker 0 loads items 0, 2; worker 1 items 1, 3
    assert not torch.equal(crops[0], crops[1]) and not torch.equal(crops[2], crops[3])


class LogitsInImage(torch.nn.Module):
    """A 'network' whose logits are written in its input: (N, 1, 1, C) -> (N, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def validate(module, images: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = trainer.validate(module, DataLoader(TensorDataset(images, targets), batch_size=7), verbose=False)
    return metrics


def test_top5_error_equals_hand_computation():
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(40, 20, generator=g), torch.randint(0, 20, (40,), generator=g)
    top5 = logits.argsort(1, descending=True)[:, :5]
    hand_top5 = 100 * sum(int(t not in row) for t, row in zip(targets.tolist(), top5.tolist(), strict=True)) / 40
    hand_top1 = 100 * (logits.argmax(1) != targets).float().mean().item()
    assert 0 < hand_top5 < hand_top1  # the draw exercises both
    metrics = validate(ClassificationModule(LogitsInImage(), num_classes=20), logits.view(40, 1, 1, 20), targets)
    assert metrics["val/top5_error"] == pytest.approx(hand_top5, abs=1e-4)
    assert metrics["val/top1_error"] == pytest.approx(hand_top1, abs=1e-4)


def test_ten_crop_evaluation_averages_the_softmax():
    g = torch.Generator().manual_seed(1)
    logits, targets = 3 * torch.randn(30, 10, 12, generator=g), torch.randint(0, 12, (30,), generator=g)
    mean_prob = logits.softmax(2).mean(1)  # (N, C): the crops' average softmax, by hand
    hand_top1 = 100 * (mean_prob.argmax(1) != targets).float().mean().item()
    hand_loss = -mean_prob[torch.arange(30), targets].log().mean().item()
    assert hand_top1 != 100 * (logits.mean(1).argmax(1) != targets).float().mean().item()  # != averaging logits
    module = ClassificationModule(LogitsInImage(), num_classes=12)
    metrics = validate(module, logits.view(30, 10, 1, 1, 12), targets)
    assert metrics["val/top1_error"] == pytest.approx(hand_top1, abs=1e-4)
    assert metrics["val/loss"] == pytest.approx(hand_loss, rel=1e-4)
