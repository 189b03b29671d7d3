"""A generated CIFAR-like dataset with learnable structure (the smoke run's data).

`make_synthetic` draws 32x32 RGB images whose class sets two things a small CNN can learn: a hue (one of
`ceil(sqrt(K))` around the colour wheel) and a texture (horizontal or vertical stripes or a checkerboard, at
2, 4, 6... cycles per image). Phase, brightness, contrast, hue jitter and pixel noise vary per image, so the
task needs the whole network, not one pixel. The hue jitter (s.d. a quarter of the spacing between hues)
makes about 5% of the images look like a neighbouring hue, so, like real data, the error falls from chance over
a few epochs and levels off above zero.
"""

from __future__ import annotations

import math

import numpy as np


def make_synthetic(num_classes: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (images uint8 (n, 32, 32, 3), labels int64 (n,)), balanced classes, deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    hues = math.ceil(math.sqrt(num_classes))
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
    hue_id, texture_id = labels % hues, labels // hues
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32) / 32.0
    # texture t: horizontal stripes, vertical stripes or a checkerboard (t % 3) of 2, 4, 6... cycles per image
    # (2 + 2 * (t // 3)); a horizontal flip or a shift keeps the class, as the CIFAR augmentation must
    kind = (texture_id % 3)[:, None, None]
    cycles = (2 + 2 * (texture_id // 3)).astype(np.float32)[:, None, None]
    phase = rng.uniform(0, 2 * np.pi, (n, 2, 1, 1)).astype(np.float32)
    wave_y = np.sin(2 * np.pi * cycles * yy[None] + phase[:, 0])
    wave_x = np.sin(2 * np.pi * cycles * xx[None] + phase[:, 1])
    pattern = np.where(kind == 0, wave_y, np.where(kind == 1, wave_x, np.sign(wave_y * wave_x)))
    stripes = 0.5 + 0.5 * pattern  # (n, 32, 32) in [0, 1]
    hue = (hue_id + rng.normal(0, 0.25, n)) / hues
    colour = _hue_to_rgb(hue)  # (n, 3) in [0, 1]
    contrast = rng.uniform(0.4, 0.8, (n, 1, 1, 1)).astype(np.float32)
    brightness = rng.uniform(0.5, 1.0, (n, 1, 1, 1)).astype(np.float32)
    img = brightness * colour[:, None, None, :] * (1 - contrast + contrast * stripes[..., None])
    img += rng.normal(0, 0.1, img.shape).astype(np.float32)
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8), labels


def _hue_to_rgb(hue: np.ndarray) -> np.ndarray:
    """Fully saturated colours of hue in [0, 1) (wrapping): (n,) -> (n, 3) RGB in [0, 1]."""
    k = (hue[:, None] * 6 + np.array([5.0, 3.0, 1.0])) % 6
    return (1 - np.clip(np.minimum(k, 4 - k), 0, 1)).astype(np.float32)
