"""Class activation maps (Zhou et al., CVPR 2016), as the Places365 release draws them (run_placesCNN_unified.py).

A network that ends in global average pooling and one linear layer scores class c as
mean_hw(sum_k w_ck f_k(h, w)) + b_c: the map sum_k w_ck f_k(h, w) over the last stage's features says where the
evidence for c lies. Every network here (ResNet, SE-ResNet(X), SENet-154, the CIFAR ones) has that head.
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import torch
from torch import nn

from backbones.fileio.atomic import atomic_write


def features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(last stage's features (N, C, h, w), logits (N, K)) in one pass; features None for a network without
    `forward_features` / `forward_head` (its logits come from `model(x)`)."""
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        return None, model(x)
    stages = model.forward_features(x)
    last = stages[list(stages)[-1]]
    return last, model.forward_head(last)


def class_activation_maps(
    model: nn.Module, features: torch.Tensor, classes: torch.Tensor, *, positive: bool = True
) -> torch.Tensor:
    """CAM of class `classes[i]` on image i: (N, C, h, w) features, (N,) classes -> (N, h, w).

    `positive`: only the channels that vote for the class (negative weights zeroed), as the release draws it.
    """
    fc = getattr(model, "fc", None)
    if not isinstance(fc, nn.Linear):
        raise TypeError(f"{type(model).__name__} has no linear classifier `fc`: no class activation map")
    weight = fc.weight[classes].to(features.dtype)
    return torch.einsum("nc,nchw->nhw", weight.clamp_min(0) if positive else weight, features)


def overlay(image: np.ndarray, cam: np.ndarray, size: int = 256) -> np.ndarray:
    """The release's picture: the CAM scaled to 0..1, coloured (jet), 0.4 x heatmap + 0.5 x image, at `size`
    pixels on the longer side. image (H, W, 3) uint8 RGB, cam (h, w) -> (size', size, 3) uint8 RGB."""
    h, w = image.shape[:2]
    scale = size / max(h, w)
    shape = (round(w * scale), round(h * scale))
    cam = cam.astype(np.float32) - cam.min()
    cam = cv2.resize(cam / max(float(cam.max()), 1e-12), shape, interpolation=cv2.INTER_LINEAR)
    heat = cv2.applyColorMap(np.uint8(255 * cam), cv2.COLORMAP_JET)[..., ::-1]
    picture = cv2.resize(image, shape, interpolation=cv2.INTER_LINEAR)
    return np.clip(0.4 * heat + 0.5 * picture, 0, 255).astype(np.uint8)


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """(H, W, 3) uint8 RGB as a PNG, written all or nothing (folders created)."""
    ok, data = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]))
    if not ok:
        raise ValueError(f"could not encode {path}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_bytes(data.tobytes()))
