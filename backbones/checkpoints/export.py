"""Writing checkpoints: ours (safetensors + JSON record) and detectron2-ready .pkl files. Never half-written.

Ours: `NAME.safetensors` holds the weights in our key names; `NAME.json` beside it records the model name, the
full constructor options, the geometry no shape shows (stride position, stem pool, SE function) and the
preprocessing the weights expect: `mean` / `std` for pixel values scaled to [0, 1], in `channel_order`
("RGB" or "BGR"), and `input_size` [C, H, W]. A random `checkpoint_id` in both files ties them together.

Detectron2: `{"model": {prefix + key: ndarray}, "__author__": "senet-suite", "matching_heuristics": False}`
with the classifier dropped, plus `"__senet__"`: our record with the detectron2 config values the weights
need (`input_format`, `pixel_mean` / `pixel_std` in 0-255 units, `stride_in_1x1`).
"""

from __future__ import annotations

import json
import os
import pickle
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..fileio.atomic import staged
from ..models.registry import model_config, model_options
from .files import RECORD_FORMAT
from .loader import CLASSIFIER, meta_model, model_geometry

IMAGENET_PREPROCESSING = {
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "channel_order": "RGB",
    "input_size": [3, 224, 224],
}
DETECTRON2_PREFIX = "backbone.bottom_up."  # our detectron2 FPN backbone keeps our ResNet as bottom_up
# output format -> the suffix its files must have, and why
OUTPUT_SUFFIXES = {
    "ours": (".safetensors", "plus a .json record beside them"),
    "detectron2": (".pkl", "detectron2 reads a weight file as a pickle only when its name ends in .pkl"),
}
CHECKPOINT_FORMATS = tuple(OUTPUT_SUFFIXES)


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    name: str | None = None,
    options: Mapping[str, Any] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    source: Mapping[str, Any] | None = None,
) -> Path:
    """Write `model` as `path` (.safetensors) plus its JSON record; `create_model(name, **options)` built it
    (by default what the model records, `model.model_cfg`).

    `preprocessing` overrides the ImageNet defaults; `source` (e.g. the file and format converted from) is
    stored as given. Returns the JSON record's path.
    """
    from safetensors.torch import save_file

    path = checked_path(path, "ours")
    record = checkpoint_record(model, name=name, options=options, preprocessing=preprocessing, source=source)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": "pt", "checkpoint_id": record["checkpoint_id"]}
    sidecar = path.with_suffix(".json")
    # Both files go to temporary names first. The record is renamed in first: cut between the two renames, the
    # new record sits beside the old weights (the id check on load catches it) or beside none, never new weights
    # beside no record, which would read as a foreign safetensors file that lost its geometry and preprocessing.
    text = json.dumps(record, indent=2) + "\n"
    with (
        staged(path, lambda tmp: save_file(tensors, tmp, metadata=metadata)) as commit_weights,
        staged(sidecar, lambda tmp: Path(tmp).write_text(text)) as commit_json,
    ):
        commit_json()
        commit_weights()
    return sidecar


def checkpoint_record(
    model: nn.Module,
    *,
    name: str | None = None,
    options: Mapping[str, Any] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    source: Mapping[str, Any] | None = None,
) -> dict:
    """Our JSON record of `model`: architecture (checked against the model), geometry, preprocessing."""
    if name is None:
        built = getattr(model, "model_cfg", None)
        if built is None:
            raise ValueError("the model records no registry name (not built by create_model): pass name= and options=")
        name, options = built.name, {**built.options, **dict(options or {})}
    cls, kwargs = model_config(name, **dict(options or {}))
    _check_describes(model, cls, kwargs, name)
    return {
        "format": RECORD_FORMAT,
        "checkpoint_id": uuid.uuid4().hex,
        "model": name,
        "options": _json_options(name, dict(options or {})),
        "geometry": model_geometry(model),
        "preprocessing": _preprocessing(preprocessing),
        "num_classes": getattr(model, "num_classes", None),
        "source": dict(source or {}),
    }


def to_detectron2(state_dict: Mapping[str, torch.Tensor], *, prefix: str = DETECTRON2_PREFIX) -> dict[str, np.ndarray]:
    """Our state dict as detectron2 model weights: `prefix + key` -> float32 ndarray.

    The classifier is dropped (detection has no use for it) and so is BN's `num_batches_tracked` (detectron2's
    FrozenBatchNorm2d has none; a trainable BN fills it in).
    """
    out = {}
    for key, value in state_dict.items():
        if key.startswith(CLASSIFIER) or key.endswith("num_batches_tracked"):
            continue
        value = value.detach().to("cpu")
        out[prefix + key] = (value.float() if value.is_floating_point() else value).numpy()
    return out


def save_detectron2(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    name: str | None = None,
    options: Mapping[str, Any] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    source: Mapping[str, Any] | None = None,
    prefix: str = DETECTRON2_PREFIX,
) -> Path:
    """Write `model` as a detectron2 .pkl (see the module docstring); returns `path`."""
    path = checked_path(path, "detectron2")
    record = checkpoint_record(model, name=name, options=options, preprocessing=preprocessing, source=source)
    pre = record["preprocessing"]
    record.update(
        input_format=pre["channel_order"],
        pixel_mean=[round(255 * m, 4) for m in pre["mean"]],
        pixel_std=[round(255 * s, 4) for s in pre["std"]],
        stride_in_1x1=record["geometry"].get("stride_in_1x1", False),
        prefix=prefix,
    )
    payload = {
        "model": to_detectron2(model.state_dict(), prefix=prefix),
        "__author__": "senet-suite",
        "matching_heuristics": False,
        "__senet__": record,
    }
    with staged(path, lambda tmp: Path(tmp).write_bytes(pickle.dumps(payload, protocol=4))) as commit:
        commit()
    return path


def checked_path(path: str | os.PathLike, to: str) -> Path:
    """`path` as a Path, or a ValueError when its suffix is not the one format `to` is written with."""
    path = Path(path)
    suffix, why = OUTPUT_SUFFIXES[to]
    if path.suffix != suffix:
        raise ValueError(f"{path}: the {to} format writes {suffix} files ({why})")
    return path


def _check_describes(model: nn.Module, cls: type, kwargs: dict, name: str) -> None:
    """Refuse to record options that do not build `model` (compared key by key, shape by shape, on meta)."""
    probe = meta_model(cls, kwargs)
    want = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if want != have or model_geometry(probe) != model_geometry(model):
        diff = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
        raise ValueError(
            f"create_model({name!r}, **options) does not build this model (differing keys: {diff[:5]}, "
            f"geometry {model_geometry(probe)} vs {model_geometry(model)}): pass the options it was built with"
        )


def _json_options(name: str, options: dict) -> dict:
    """Every option of model `name` (flat, as `create_model` takes them) as JSON; a value that JSON cannot hold
    (a callable such as norm_layer) only when left at its default, which is then not recorded."""
    defaults = model_options(name)
    out = {}
    for key, value in {**defaults, **options}.items():
        value = list(value) if isinstance(value, tuple) else value
        try:
            json.dumps(value)
        except TypeError:
            if value is defaults.get(key):
                continue
            raise ValueError(f"option {key}={value!r} cannot be recorded in a JSON checkpoint record") from None
        out[key] = value
    return out


def _preprocessing(overrides: Mapping[str, Any] | None) -> dict:
    pre = {**IMAGENET_PREPROCESSING, **dict(overrides or {})}
    unknown = sorted(set(pre) - set(IMAGENET_PREPROCESSING))
    if unknown:
        raise ValueError(f"unknown preprocessing field(s) {unknown}; known: {', '.join(IMAGENET_PREPROCESSING)}")
    if pre["channel_order"] not in ("RGB", "BGR"):
        raise ValueError(f"channel_order must be 'RGB' or 'BGR', got {pre['channel_order']!r}")
    for key in ("mean", "std"):
        if len(pre[key]) != pre["input_size"][0]:
            raise ValueError(f"preprocessing {key} needs one value per input channel, got {pre[key]}")
        pre[key] = [float(v) for v in pre[key]]
    pre["input_size"] = [int(v) for v in pre["input_size"]]
    return pre
