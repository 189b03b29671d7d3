"""A generated CIFAR-like dataset with learnable structure, and a writer of the official on-disk layout.

`make_synthetic` draws 32x32 RGB images whose class sets two things a small CNN can learn: a hue (one of
`ceil(sqrt(K))` around the colour wheel) and a texture (horizontal or vertical stripes or a checkerboard, at
2, 4, 6... cycles per image). Phase, brightness, contrast, hue jitter and pixel noise vary per image, so the
task needs the whole network, not one pixel. The hue jitter (s.d. a quarter of the spacing between hues)
makes about 5% of the images look like a neighbouring hue, so, like real data, the error falls from chance over
a few epochs and levels off above zero.

`write_cifar_folder` writes images in the official python-version layout with Python-2 style pickles
(keys and strings are Python-2 `str`), e.g. to try the real-file loader without the real files.
"""

from __future__ import annotations

import math
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np

from .files import SPECS


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


class _Py2Pickler(pickle._Pickler):
    """Protocol-2 pickler that writes bytes and str as Python-2 `str` (SHORT_BINSTRING / BINSTRING opcodes),
    and numpy's globals under their Python-2-era module names, as cPickle did for the official files."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes | str) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str

    def save_global(self, obj: Any, name: str | None = None) -> None:
        name = name or obj.__qualname__
        module = pickle.whichmodule(obj, name).replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode("ascii"))
        self.memoize(obj)


def write_py2_pickle(obj: Any, path: str | Path) -> None:
    """Pickle `obj` the way Python 2's cPickle wrote the CIFAR files (every str and bytes -> Python-2 str)."""
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def write_cifar_folder(
    root: str | Path,
    dataset: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    class_names: list[str] | None = None,
) -> Path:
    """Write (images uint8 (N, 32, 32, 3), labels (N,)) splits as `root/<official folder>/`; -> that folder.

    CIFAR-10's train split is cut into five data_batch files as the release does.
    """
    spec = SPECS[dataset]
    folder = Path(root) / spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    names = class_names or [f"class_{i}" for i in range(spec.num_classes)]

    def batch(images: np.ndarray, labels: np.ndarray, label: str, start: int) -> dict[bytes, Any]:
        # (N, 32, 32, 3) -> (N, 3072) as R plane, G plane, B plane, each row-major
        data = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), 3072)
        out = {
            b"batch_label": label.encode(),
            b"data": data,
            b"filenames": [f"synthetic_{start + i:05d}.png".encode() for i in range(len(images))],
        }
        if dataset == "cifar10":
            out[b"labels"] = [int(v) for v in labels]
        else:
            out[b"fine_labels"] = [int(v) for v in labels]
            out[b"coarse_labels"] = [int(v) // 5 for v in labels]
        return out

    if dataset == "cifar10":
        chunks = np.array_split(np.arange(len(train[0])), len(spec.train_files))
        for i, (name, idx) in enumerate(zip(spec.train_files, chunks, strict=True)):
            label = f"training batch {i + 1} of {len(spec.train_files)}"
            write_py2_pickle(batch(train[0][idx], train[1][idx], label, int(idx[0]) if len(idx) else 0), folder / name)
        write_py2_pickle(batch(*test, "testing batch 1 of 1", 0), folder / "test_batch")
        meta = {b"label_names": [n.encode() for n in names], b"num_cases_per_batch": 10000, b"num_vis": 3072}
        write_py2_pickle(meta, folder / spec.meta_file)
    else:
        write_py2_pickle(batch(*train, "training", 0), folder / "train")
        write_py2_pickle(batch(*test, "testing", 0), folder / "test")
        meta = {
            b"fine_label_names": [n.encode() for n in names],
            b"coarse_label_names": [f"superclass_{i}".encode() for i in range(20)],
        }
        write_py2_pickle(meta, folder / spec.meta_file)
    return folder
