"""The official CIFAR python-version files, written as Python 2 wrote them: test fixtures for cifar.files.

`write_py2_pickle` pickles the way Python 2's cPickle did (keys and strings as Python-2 `str`);
`write_cifar_folder` writes whole splits in the official layout, to train on the real-file loader without the
real files.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np

from cifar.files import SPECS


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
