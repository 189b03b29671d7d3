"""Readers of the official CIFAR-10 / CIFAR-100 "python version" files, exactly as released.

Layout (formats.md): `<root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}` and
`<root>/cifar-100-python/{train, test, meta}`. Each file is a Python-2 cPickle of a dict whose keys and strings
are Python-2 `str`: unpickled with encoding="latin1" they are `str`, with encoding="bytes" they are `bytes`.
`normalize_keys` accepts either (and a re-pickled Python-3 dict with str keys). `data` is uint8 (N, 3072):
the red, green and blue 32x32 planes, each row-major. The files are unpickled with a numpy-only allow-list:
a pickle can run any code it names, and these files need nothing but containers, strings and arrays.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from backbones.fileio import ForbiddenGlobal, NumpyUnpickler


class CIFARFormatError(ValueError):
    """A CIFAR file is missing, corrupt, or not in the official format; the message names the file."""


@dataclass(frozen=True)
class CIFARSpec:
    """Where a CIFAR variant lives under `root` and what its files hold."""

    name: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int
    md5: dict[str, str]

    def layout(self) -> str:
        files = ", ".join((*self.train_files, *self.test_files, self.meta_file))
        return f"<root>/{self.folder}/ holding {files}"


# Official MD5s as torchvision lists them (formats.md).
CIFAR10 = CIFARSpec(
    name="cifar10",
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    meta_file="batches.meta",
    label_key="labels",
    names_key="label_names",
    num_classes=10,
    md5={
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
        "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
    },
)
CIFAR100 = CIFARSpec(
    name="cifar100",
    folder="cifar-100-python",
    train_files=("train",),
    test_files=("test",),
    meta_file="meta",
    label_key="fine_labels",
    names_key="fine_label_names",
    num_classes=100,
    md5={
        "train": "16019d7e3df5f24257cddd939b257f8d",
        "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
        "meta": "7973b15100ade9c7d40fb424638fde48",
    },
)
SPECS = {"cifar10": CIFAR10, "cifar100": CIFAR100}


def normalize_keys(obj: Any) -> Any:
    """Decode bytes keys and strings (encoding="bytes" loads) to str, recursively through dicts and lists."""
    if isinstance(obj, bytes):
        return obj.decode("latin1")
    if isinstance(obj, dict):
        return {normalize_keys(k): normalize_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [normalize_keys(v) for v in obj]
    return obj


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def dataset_dir(root: str | Path, spec: CIFARSpec) -> Path:
    """The extracted folder: `root/<folder>`, or `root` itself when the user pointed at that folder."""
    root = Path(root).expanduser()
    if root.name == spec.folder or ((root / spec.meta_file).is_file() and not (root / spec.folder).is_dir()):
        return root
    return root / spec.folder


def _check_files(folder: Path, names: tuple[str, ...], spec: CIFARSpec) -> None:
    missing = [n for n in names if not (folder / n).is_file()]
    if not folder.is_dir():
        raise CIFARFormatError(
            f"{spec.name} not found: {folder} does not exist. Expected the extracted python version "
            f"(https://www.cs.toronto.edu/~kriz/cifar.html): {spec.layout()}. Point --data.root at the folder "
            f"that holds {spec.folder}/, or pass --data.download true to fetch it."
        )
    if missing:
        raise CIFARFormatError(
            f"{spec.name}: missing {', '.join(str(folder / n) for n in missing)}; expected {spec.layout()}"
        )


def load_pickle(path: Path) -> dict[str, Any]:
    """Unpickle one official file -> dict with str keys; CIFARFormatError naming the file if it cannot."""
    try:
        with open(path, "rb") as f:
            # latin1 maps every Python-2 byte string 1:1 to str, and is what numpy needs for py2 arrays
            obj = NumpyUnpickler(f, encoding="latin1").load()
    except ForbiddenGlobal as e:
        raise CIFARFormatError(
            f"{path}: refused to unpickle it: it names {e}, which no CIFAR file needs, and unpickling would run it"
        ) from e
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as e:
        raise CIFARFormatError(
            f"{path}: not a readable CIFAR python-version pickle (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from e
    if not isinstance(obj, dict):
        raise CIFARFormatError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    return normalize_keys(obj)


def parse_batch(obj: dict[str, Any], label_key: str, num_classes: int, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A batch dict -> (images uint8 (N, 32, 32, 3) HWC RGB, labels int64 (N,)); errors name `path`."""
    missing = [k for k in ("data", label_key) if k not in obj]
    if missing:
        raise CIFARFormatError(f"{path}: missing key(s) {missing}; found {sorted(obj)}")
    data = obj["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise CIFARFormatError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), found {desc}")
    try:
        labels = np.asarray(obj[label_key], dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise CIFARFormatError(f"{path}: {label_key!r} is not a list of integers: {e}") from e
    if labels.shape != (len(data),):
        raise CIFARFormatError(f"{path}: {len(data)} images but {label_key!r} has shape {labels.shape}")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise CIFARFormatError(
            f"{path}: {label_key}[{bad[0]}] = {labels[bad[0]]} is outside 0..{num_classes - 1} "
            f"({len(bad)} label(s) out of range)"
        )
    # (N, 3072) = (N, plane R/G/B, row, col) -> HWC
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def load_split(
    root: str | Path, spec: CIFARSpec, train: bool, verify_md5: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """All batches of the train or test split -> (images uint8 (N, 32, 32, 3), labels int64 (N,))."""
    folder = dataset_dir(root, spec)
    names = spec.train_files if train else spec.test_files
    _check_files(folder, names, spec)
    images, labels = [], []
    for name in names:
        path = folder / name
        if verify_md5:
            verify(path, spec.md5[name])
        x, y = parse_batch(load_pickle(path), spec.label_key, spec.num_classes, path)
        images.append(x)
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels)


def load_class_names(root: str | Path, spec: CIFARSpec, verify_md5: bool = False) -> list[str]:
    """Class names from the meta file, in label order."""
    folder = dataset_dir(root, spec)
    _check_files(folder, (spec.meta_file,), spec)
    path = folder / spec.meta_file
    if verify_md5:
        verify(path, spec.md5[spec.meta_file])
    meta = load_pickle(path)
    names = meta.get(spec.names_key)
    if not isinstance(names, list) or len(names) != spec.num_classes:
        found = len(names) if isinstance(names, list) else type(names).__name__
        raise CIFARFormatError(f"{path}: {spec.names_key!r} must list {spec.num_classes} names, found {found}")
    return [str(n) for n in names]


def verify(path: Path, expected: str) -> None:
    actual = md5sum(path)
    if actual != expected:
        raise CIFARFormatError(
            f"{path}: MD5 {actual} does not match the official {expected}; the file is corrupt or not the "
            "official release (re-extract it, or set --data.verify_md5 false to use it anyway)"
        )
