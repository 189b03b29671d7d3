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

import inspect
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

from .atomic import staged
from .checkpoint_files import RECORD_FORMAT, read_checkpoint
from .loader import CLASSIFIER, LoadReport, build_pretrained, meta_model, model_geometry
from .registry import model_config

IMAGENET_PREPROCESSING = {
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "channel_order": "RGB",
    "input_size": [3, 224, 224],
}
DETECTRON2_PREFIX = "backbone.bottom_up."  # our detectron2 FPN backbone keeps our ResNet as bottom_up
# output format -> the suffix its files must have, and why
_OUTPUT_SUFFIXES = {
    "ours": (".safetensors", "plus a .json record beside them"),
    "detectron2": (".pkl", "detectron2 reads a weight file as a pickle only when its name ends in .pkl"),
}
CHECKPOINT_FORMATS = tuple(_OUTPUT_SUFFIXES)


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    name: str,
    options: Mapping[str, Any] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    source: Mapping[str, Any] | None = None,
) -> Path:
    """Write `model` as `path` (.safetensors) plus its JSON record; `create_model(name, **options)` built it.

    `preprocessing` overrides the ImageNet defaults; `source` (e.g. the file and format converted from) is
    stored as given. Returns the JSON record's path.
    """
    from safetensors.torch import save_file

    path = _checked_path(path, "ours")
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
    name: str,
    options: Mapping[str, Any] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    source: Mapping[str, Any] | None = None,
) -> dict:
    """Our JSON record of `model`: architecture (checked against the model), geometry, preprocessing."""
    cls, kwargs = model_config(name, **dict(options or {}))
    _check_describes(model, cls, kwargs, name)
    return {
        "format": RECORD_FORMAT,
        "checkpoint_id": uuid.uuid4().hex,
        "model": name,
        "options": _json_options(cls, kwargs),
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
    name: str,
    options: Mapping[str, Any] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    source: Mapping[str, Any] | None = None,
    prefix: str = DETECTRON2_PREFIX,
) -> Path:
    """Write `model` as a detectron2 .pkl (see the module docstring); returns `path`."""
    path = _checked_path(path, "detectron2")
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


def convert_checkpoint(
    src: Any,
    dst: str | os.PathLike,
    *,
    arch: str | None = None,
    from_format: str | None = None,
    to: str | None = None,
    trusted: bool = False,
    ema: bool = False,
    prefix: str | None = None,
    options: Mapping[str, Any] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    detectron2_prefix: str = DETECTRON2_PREFIX,
) -> LoadReport:
    """Load `src` into model `arch` (configured as the weights need, `options` on top) and write it as `to`.

    `to` defaults from the suffix of `dst`: .pkl -> "detectron2", else "ours". The preprocessing recorded in an
    `src` of ours carries over; otherwise the ImageNet RGB defaults, with `preprocessing` on top.
    """
    dst = Path(dst)
    to = to or next((f for f, (suffix, _) in _OUTPUT_SUFFIXES.items() if suffix == dst.suffix), "ours")
    if to not in CHECKPOINT_FORMATS:
        raise ValueError(f"unknown output format {to!r}; choose one of {', '.join(CHECKPOINT_FORMATS)}")
    _checked_path(dst, to)  # before the (slow) load
    checkpoint = read_checkpoint(src, trusted=trusted)
    model, report, name, used = build_pretrained(
        arch, checkpoint, format=from_format, ema=ema, prefix=prefix, **dict(options or {})
    )
    recorded = (checkpoint.record or {}).get("preprocessing", {})
    kwargs = {
        "name": name,
        "options": used,
        "preprocessing": {**recorded, **dict(preprocessing or {})},
        "source": {"path": report.source, "format": report.format, "prefix": report.prefix, "ema": report.ema},
    }
    if to == "ours":
        save_checkpoint(model, dst, **kwargs)
    else:
        save_detectron2(model, dst, prefix=detectron2_prefix, **kwargs)
    return report


def _checked_path(path: str | os.PathLike, to: str) -> Path:
    """`path` as a Path, or a ValueError when its suffix is not the one format `to` is written with."""
    path = Path(path)
    suffix, why = _OUTPUT_SUFFIXES[to]
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


def _json_options(cls: type, kwargs: dict) -> dict:
    """Constructor options as JSON; non-JSON values (callables such as norm_layer) only when left at default."""
    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()}
    out = {}
    for key, value in kwargs.items():
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
