"""A trained classifier back from its checkpoint, with the preprocessing and the class names of its training.

`load_classifier(path)` reads
- a Lightning checkpoint of the trainers (tools/train_{cifar,places365,imagenet}.py): the network from the
  model hyperparameters; the DataModule class that the checkpoint records (its `state_dict`, a class path),
  imported by that path and rebuilt from its hyperparameters, tells the preprocessing (`eval_preprocessing`)
  and the class names (`display_names`), and rebuilds the run's validation data (`Classifier.datamodule()`).
  This layer imports no task package: each DataModule describes itself. A checkpoint written before the
  DataModules recorded their class is refused with a DataError that says what to do;
- any checkpoint `backbones` loads (ours, safetensors + JSON, records its model and `preprocessing`; a
  foreign one needs `model=` its registry name and gets the ImageNet preprocessing).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from backbones import CifarResNet, create_model, create_pretrained, read_checkpoint
from backbones.checkpoints.export import IMAGENET_PREPROCESSING

from .loaders import ClassificationDataModule
from .samples import IMAGE_SUFFIXES, DataError
from .transforms import build_eval_transform, normalize, read_image

LIST_SUFFIXES = (".txt", ".lst", ".list")


@dataclass(frozen=True)
class Preprocessing:
    """Evaluation preprocessing: shorter side to `resize_size`, centre crop `crop_size`, (x / 255 - mean) / std.

    CIFAR networks see their 32 x 32 images as they are (resize_size = crop_size = 32).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_size: int
    resize_size: int
    channel_order: str = "RGB"

    def crop(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> the (S, S, 3) uint8 centre crop the network sees."""
        return build_eval_transform(self.crop_size, self.resize_size).pipeline(image=image)["image"]

    def tensor(self, crop: np.ndarray) -> torch.Tensor:
        """A crop -> normalised float (3, S, S), in the channel order of the weights."""
        x = torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1)))
        x = normalize(x, self.mean, self.std)
        return x.flip(0) if self.channel_order == "BGR" else x


@dataclass
class Classifier:
    """A network in eval mode, its class names (by index) and preprocessing; `data` holds the training run's
    DataModule hyperparameters and `datamodule_class` its class when the checkpoint recorded them."""

    model: nn.Module
    class_names: list[str]
    preprocessing: Preprocessing
    source: str
    data: dict[str, Any] | None = None
    datamodule_class: type[ClassificationDataModule] | None = field(default=None, repr=False)
    _datamodule: Any = field(default=None, repr=False)

    def datamodule(self, **overrides: Any) -> ClassificationDataModule:
        """The training run's DataModule (with `overrides`), set up for evaluation; DataError without one."""
        if self._datamodule is None or overrides:
            if self.data is None or self.datamodule_class is None:
                raise DataError(f"{self.source} records no training data (not a Lightning checkpoint of the trainers)")
            dm = datamodule_from_hparams(self.datamodule_class, {**self.data, **overrides})
            dm.prepare_data()  # writes a generated dataset (the synthetic Places365 release) when it is gone
            dm.setup("validate")
            self._datamodule = dm
        return self._datamodule


def datamodule_from_hparams(cls: type[ClassificationDataModule], hparams: dict[str, Any]) -> ClassificationDataModule:
    """DataModule `cls` rebuilt from the `hparams` it saved (a checkpoint's `datamodule_hyper_parameters`; the
    CLI's private `_instantiator` / `_class_path` entries left out); not set up."""
    return cls(**{k: v for k, v in hparams.items() if not k.startswith("_")})


def recorded_datamodule_class(ckpt: dict, source: str) -> type[ClassificationDataModule] | None:
    """The DataModule class a Lightning checkpoint records (its `state_dict`, saved under the class's qualname:
    {"class_path": "<module>.<qualname>"}); None when it records none.

    Only a class this process has already imported counts (the tools import the trainers' DataModules, as
    Lightning resolves only classes it knows): a checkpoint's text never decides which module gets imported, since
    importing runs that module's code. DataError for a record of any other class.
    """
    records = {
        qualname: state["class_path"]
        for qualname, state in ckpt.items()
        if isinstance(state, dict) and str(state.get("class_path", "")).endswith(f".{qualname}")
    }
    if not records:
        return None
    if len(records) > 1:
        raise DataError(f"{source}: records more than one DataModule class: {', '.join(records.values())}")
    (path,) = records.values()
    known = {f"{c.__module__}.{c.__qualname__}": c for c in _subclasses(ClassificationDataModule)}
    if path not in known:
        raise DataError(
            f"{source}: its DataModule {path} is not one of the DataModules loaded here ({', '.join(sorted(known))}); "
            "import its module first"
        )
    return known[path]


def _subclasses(cls: type) -> list[type]:
    return [sub for direct in cls.__subclasses__() for sub in (direct, *_subclasses(direct))]


def load_classifier(
    path: str | os.PathLike,
    *,
    model: str | None = None,
    labels: str | os.PathLike | None = None,
    trusted: bool = False,
    device: str | torch.device = "cpu",
) -> Classifier:
    """The classifier in checkpoint `path` (see the module docstring); `labels` overrides the class names
    (a file with one name per line, or Places365's `/a/airfield 0` lines)."""
    lightning = _lightning_checkpoint(Path(path))
    if lightning is not None:
        classifier = _from_lightning(lightning, str(path), model)
    else:
        checkpoint = read_checkpoint(path, trusted=trusted)
        net = create_pretrained(model, checkpoint)
        pre = {**IMAGENET_PREPROCESSING, **((checkpoint.record or {}).get("preprocessing") or {})}
        crop = int(pre["input_size"][-1])
        # ImageNet networks evaluate a centre crop of the image resized to 256 / 224 of it; CIFAR ones see it whole
        resize = crop if isinstance(net, CifarResNet) else round(crop / 0.875)
        preprocessing = Preprocessing(tuple(pre["mean"]), tuple(pre["std"]), crop, resize, pre["channel_order"])
        classifier = Classifier(net, [], preprocessing, str(path))
    num_classes = classifier.model.num_classes
    if labels is not None:
        classifier.class_names = read_labels(labels)
    if len(classifier.class_names) != num_classes:
        if labels is not None:
            raise DataError(f"{labels}: {len(classifier.class_names)} names for a {num_classes}-class model")
        classifier.class_names = [f"class_{i}" for i in range(num_classes)]
    classifier.model.eval().to(device)
    return classifier


def _lightning_checkpoint(path: Path) -> dict | None:
    """The checkpoint dict when `path` is a Lightning checkpoint of ours (plain types: loads weights-only)."""
    if not (path.is_file() and zipfile.is_zipfile(path)):
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001  (not weights-only: read_checkpoint explains what it holds)
        return None
    return obj if isinstance(obj, dict) and {"state_dict", "hyper_parameters"} <= obj.keys() else None


def _from_lightning(ckpt: dict, source: str, model: str | None) -> Classifier:
    hp = ckpt["hyper_parameters"]
    name = model or hp.get("model")
    if not isinstance(name, str):
        raise DataError(f"{source}: the network was built in code, not by name; pass its registry name (--model)")
    net = create_model(name, **{"num_classes": hp["num_classes"], **(hp.get("model_options") or {})})
    net.load_state_dict({k[6:]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")})
    data = ckpt.get("datamodule_hyper_parameters")
    if not data:  # trained without a DataModule: nothing tells the preprocessing, the ImageNet one is assumed
        mean, std = tuple(IMAGENET_PREPROCESSING["mean"]), tuple(IMAGENET_PREPROCESSING["std"])
        return Classifier(net, [], Preprocessing(mean, std, 224, 256), source)
    cls = recorded_datamodule_class(ckpt, source)
    if cls is None:
        raise DataError(
            f"{source}: written before checkpoints recorded their DataModule class, so its preprocessing and "
            "class names are unknown; add {'class_path': '<module>.<DataModule class>'} under the class's name"
        )
    dm = datamodule_from_hparams(cls, data)
    pre = dm.eval_preprocessing
    preprocessing = Preprocessing(tuple(pre["mean"]), tuple(pre["std"]), int(pre["crop_size"]), int(pre["resize_size"]))
    try:
        names = dm.display_names
    except (DataError, OSError, ValueError, KeyError):  # the run's files are not here: class_i names
        names = []
    return Classifier(net, names, preprocessing, source, dict(data), cls)


def read_labels(path: str | os.PathLike) -> list[str]:
    """Class names by index: one per line, or `<name> <index>` lines in index order (Places365's categories:
    their names are taken as written, `/a/airfield`)."""
    names = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        fields = line.split()
        if fields:
            names.append(fields[0] if len(fields) == 2 and fields[1].isdigit() else line.strip())
    return names


def run_name(path: str | os.PathLike) -> str:
    """A checkpoint as a title: `.../cifar10_synthetic/checkpoints/last.ckpt` -> `cifar10_synthetic/last.ckpt`."""
    path = Path(path)
    return f"{path.parent.parent.name}/{path.name}" if path.parent.name == "checkpoints" else path.name


def image_paths(inputs: Iterable[str | os.PathLike]) -> Iterator[Path]:
    """Image files from files, folders (their images, recursively, in name order) and list files (one path per
    line, first field, relative to the list's folder: Places365's `places365_val.txt` lines work)."""
    for item in map(Path, inputs):
        if item.is_dir():
            yield from sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif item.suffix.lower() in LIST_SUFFIXES:
            for line in item.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    yield item.parent / line.split()[0].lstrip("/")
        else:
            yield item


def read_images(paths: Iterable[Path]) -> Iterator[tuple[str, np.ndarray]]:
    """(path, (H, W, 3) uint8 RGB) for each readable image; DataError naming an unreadable one."""
    for path in paths:
        try:
            yield str(path), read_image(path)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: {e}") from e


def validation_samples(classifier: Classifier, count: int) -> list[tuple[str, np.ndarray, int]]:
    """`count` images spread evenly over the training run's validation set: (name, RGB uint8, label)."""
    dm = classifier.datamodule()
    dataset = dm.val_set
    picks = np.unique(np.linspace(0, len(dataset) - 1, min(count, len(dataset))).round().astype(int))
    if hasattr(dataset, "samples"):  # image files (Places365, ImageNet)
        return [(s.path, read_image(s.path), s.label) for s in map(dataset.samples.__getitem__, picks)]
    images = dataset.images  # CIFAR in memory: HWC numpy, or the batched path's CHW tensor
    rgb = images[picks].numpy().transpose(0, 2, 3, 1) if torch.is_tensor(images) else images[picks]
    return [(f"val[{i}]", image, int(dataset.labels[i])) for i, image in zip(picks, rgb, strict=True)]
