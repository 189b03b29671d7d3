"""Decoding and augmentation of the image-file pipeline (Places365 and ImageNet), with albumentations.

Training: random-resized crop (area 8-100%, aspect 3/4-4/3) to 224 + horizontal flip; evaluation: shorter
side to 256, centre crop 224, or the ten crops (four corners and centre, and their mirrors). Images are
decoded with OpenCV, which decodes these JPEGs faster than PIL. The workers hand over uint8 tensors and
`normalize` runs on the training device (as timm's prefetcher and DALI do): float normalisation was the
most expensive step of a worker, and uint8 batches move to the GPU in a quarter of the bytes.
The torchvision equivalents are kept here for the throughput comparison only (`tools/benchmark.py --sections data`).
"""

from __future__ import annotations

import functools
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations otherwise queries PyPI at import

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)  # OpenCV >= 4.10 decodes straight to RGB


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes (JPEG, PNG, ...) -> (H, W, 3) uint8 RGB; grey and CMYK JPEGs come back as RGB.

    Raises ValueError when the bytes are empty, corrupt or truncated.
    """
    if not data:
        raise ValueError("empty file")
    buf = np.frombuffer(data, dtype=np.uint8)
    image = cv2.imdecode(buf, cv2.IMREAD_COLOR if _IMREAD_RGB is None else _IMREAD_RGB)
    if image is None:
        raise ValueError("not a decodable image (corrupt or truncated)")
    return image if _IMREAD_RGB is not None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """The image file at `path` as (H, W, 3) uint8 RGB. Raises OSError (missing) or ValueError (corrupt)."""
    with open(path, "rb") as f:
        return decode_image(f.read())


class ImageTransform:
    """(H, W, 3) uint8 RGB -> uint8 tensor (3, S, S), or (10, 3, S, S) with `ten_crop`; see `normalize`.

    Wraps an albumentations pipeline; `set_random_seed(seed)` (albumentations' name) gives each DataLoader
    worker its own random stream (a forked worker otherwise repeats the parent's: all would draw the same crops).
    """

    def __init__(self, pipeline: A.Compose, ten_crop: int | None = None):
        self.pipeline = pipeline
        self.ten_crop = ten_crop

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        out = self.pipeline(image=image)["image"]
        if self.ten_crop is None:
            return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))
        crops = ten_crops(out, self.ten_crop)
        return torch.from_numpy(np.ascontiguousarray(crops.transpose(0, 3, 1, 2)))

    def set_random_seed(self, seed: int) -> None:
        self.pipeline.set_random_seed(seed)

    def __repr__(self) -> str:
        extra = f", ten_crop={self.ten_crop}" if self.ten_crop else ""
        return f"ImageTransform({self.pipeline!r}{extra})"


def build_train_transform(
    crop_size: int = 224,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
) -> ImageTransform:
    """Random-resized crop to `crop_size` + horizontal flip: (H, W, 3) uint8 -> uint8 (3, crop, crop)."""
    return ImageTransform(
        A.Compose(
            [
                # INTER_AREA when the crop shrinks (no aliasing on data_large), bilinear when it grows.
                A.RandomResizedCrop((crop_size, crop_size), scale=scale, ratio=ratio, area_for_downscale="image"),
                A.HorizontalFlip(p=hflip),
            ]
        )
    )


def build_eval_transform(crop_size: int = 224, resize_size: int = 256, *, ten_crop: bool = False) -> ImageTransform:
    """Shorter side to `resize_size`, then the centre crop (3, crop, crop) or the ten crops (10, 3, crop, crop)."""
    resize = A.SmallestMaxSize(max_size=resize_size, area_for_downscale="image")
    if ten_crop:
        return ImageTransform(A.Compose([resize]), ten_crop=crop_size)
    return ImageTransform(A.Compose([resize, A.CenterCrop(crop_size, crop_size)]))


def normalize(
    images: torch.Tensor, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
) -> torch.Tensor:
    """uint8 images (..., 3, H, W) -> float32 (x / 255 - mean) / std, on the images' device."""
    mean_t, std_t = _pixel_stats(tuple(mean), tuple(std), images.device)
    return (images.float() - mean_t) / std_t


@functools.lru_cache(maxsize=8)
def _pixel_stats(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """mean and std in 0..255 units, (3, 1, 1) on `device`; made once, as a blocking copy to the GPU per batch
    would make the host wait for the GPU's queue every step."""
    return tuple(torch.tensor(v, device=device).view(-1, 1, 1) * 255 for v in (mean, std))


def ten_crops(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, C) -> (10, size, size, C): the four corners and the centre, then the same five mirrored."""
    h, w = image.shape[:2]
    if h < size or w < size:
        raise ValueError(f"ten_crops: image {h}x{w} is smaller than the crop {size}")
    top, left = (h - size) // 2, (w - size) // 2
    corners = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size), (top, left)]
    five = np.stack([image[y : y + size, x : x + size] for y, x in corners])
    return np.concatenate([five, five[:, :, ::-1]])


def torchvision_train_transform(crop_size: int = 224, *, uint8: bool = False):
    """The torchvision equivalent of `build_train_transform` (PIL image -> tensor), for comparison.

    By default the ImageNet example's pipeline, which normalises in the worker; `uint8=True` leaves the
    normalisation to the device as ours does.
    """
    from torchvision import transforms as T

    return T.Compose([T.RandomResizedCrop(crop_size), T.RandomHorizontalFlip(), *_torchvision_tail(uint8)])


def torchvision_eval_transform(crop_size: int = 224, resize_size: int = 256, *, uint8: bool = False):
    """The torchvision equivalent of `build_eval_transform` (PIL image -> tensor), for comparison."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(resize_size), T.CenterCrop(crop_size), *_torchvision_tail(uint8)])


def _torchvision_tail(uint8: bool) -> list:
    from torchvision import transforms as T

    return [T.PILToTensor()] if uint8 else [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def read_image_pil(path: str | os.PathLike):
    """The image at `path` as an RGB PIL image (the torchvision pipeline's loader)."""
    from PIL import Image

    with open(path, "rb") as f:
        image = Image.open(f)
        return image.convert("RGB")
