"""CIFAR augmentation (the paper's protocol): zero-pad 4 px, random 32x32 crop, horizontal flip, normalise.

Two implementations of the same augmentation:
  - `train_transform()`: albumentations, one HWC uint8 image at a time, in the DataLoader workers;
  - `BatchAugment`: the same on a whole (N, 3, 32, 32) uint8 batch on the training device. CIFAR images are
    so small that per-sample Python overhead dominates (`tools/benchmark.py --sections data` measures both); the
    batched path keeps a GPU fed from one CPU core.
In the batched path the crop offsets and the flip of a sample are a hash of (seed, epoch, sample index): the
augmentation does not depend on batch composition, worker count, number of GPUs or a resume.
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

PAD = 4
SIZE = 32
OFFSETS = 2 * PAD + 1  # crop offsets 0..8 in each axis

# Per-channel mean and std of the training pixels, in [0, 1] (std over all pixels, not of the image means)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def train_transform(mean: tuple[float, ...], std: tuple[float, ...]) -> A.Compose:
    """albumentations: HWC uint8 (32, 32, 3) -> normalised float CHW tensor (3, 32, 32), randomly cropped/flipped."""
    return A.Compose(
        [
            A.Pad(padding=PAD, fill=0, border_mode=cv2.BORDER_CONSTANT),
            A.RandomCrop(SIZE, SIZE),
            A.HorizontalFlip(p=0.5),
            A.Normalize(mean=mean, std=std, max_pixel_value=255.0),
            ToTensorV2(),
        ]
    )


def eval_transform(mean: tuple[float, ...], std: tuple[float, ...]) -> A.Compose:
    """albumentations: HWC uint8 (32, 32, 3) -> normalised float CHW tensor (3, 32, 32)."""
    return A.Compose([A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()])


def _mulmod32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32), in 16-bit halves so no int64 product overflows."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & 0xFFFFFFFF


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A well-mixed 32-bit integer hash (Wellons' "lowbias32") of int64 values, elementwise, in [0, 2**32)."""
    x = x & 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = _mulmod32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mulmod32(x, 0x846CA68B)
    return x ^ (x >> 16)


def augment_params(index: torch.Tensor, epoch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crop offsets and flips of samples `index` (N,) in `epoch`: (top (N,), left (N,), flip (N,) bool).

    top, left are uniform in 0..8 (the crop window's corner in the 40x40 padded image), flip is a fair coin.
    """
    # a Python int: a tensor key would be copied to the GPU, and the host stalled, for every batch
    key = int(hash32(torch.tensor(seed, dtype=torch.int64) * 0x10001 + epoch))
    h = hash32(index.long() ^ key)
    # 2**32 is not a multiple of 162: the bias is below 1e-7, far under what any test or training can see
    top = h % OFFSETS
    left = (h // OFFSETS) % OFFSETS
    flip = (h // (OFFSETS * OFFSETS)) % 2 == 1
    return top, left, flip


def crop_flip(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Zero-pad by 4, crop 32x32 at (top, left), flip where `flip`: (N, C, 32, 32) -> (N, C, 32, 32), any dtype."""
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (PAD, PAD, PAD, PAD))
    ar = torch.arange(SIZE, device=images.device)
    rows = top[:, None] + ar  # (N, 32)
    cols = left[:, None] + torch.where(flip[:, None], ar.flip(0), ar)  # a flipped crop reads its columns backwards
    batch = torch.arange(n, device=images.device)[:, None, None]
    # advanced indexing -> (N, 32, 32, C); back to channels-first
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


class BatchAugment:
    """The batched path: uint8 (N, 3, 32, 32) on any device -> normalised float (N, 3, 32, 32).

    `augment=True` applies pad-crop-flip with the parameters of `augment_params(index, epoch, seed)`;
    normalisation always follows, as in the albumentations pipelines.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], seed: int = 0):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
        self.seed = seed

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        if self.mean.device != images.device:  # once, not a blocking copy per batch
            self.mean, self.std = self.mean.to(images.device), self.std.to(images.device)
        return (images.float() - self.mean) / self.std

    def __call__(self, images: torch.Tensor, index: torch.Tensor, epoch: int, augment: bool = True) -> torch.Tensor:
        if augment:
            images = crop_flip(images, *augment_params(index, epoch, self.seed))
        return self.normalize(images)


def to_chw(images: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) HWC uint8 -> (N, 3, 32, 32) contiguous."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
