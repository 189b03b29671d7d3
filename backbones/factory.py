"""Building models: `create_model(name, pretrained=...)`, and the model a checkpoint needs (`create_pretrained`).

This module sits above the two halves of the package: the registry (`models`), which builds networks and knows
nothing of files, and the loader (`checkpoints`), which loads weights into any model it is handed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from .checkpoints.export import (
    CHECKPOINT_FORMATS,
    DETECTRON2_PREFIX,
    OUTPUT_SUFFIXES,
    checked_path,
    save_checkpoint,
    save_detectron2,
)
from .checkpoints.files import read_checkpoint
from .checkpoints.formats import SE_FC1_BIAS, SE_FC1_WEIGHT, has_se
from .checkpoints.loader import (
    CLASSIFIER,
    LoadReport,
    Selection,
    as_options,
    load_pretrained,
    load_selection,
    meta_model,
    model_geometry,
    select_weights,
)
from .models.registry import build_model, model_config, model_options
from .models.se import se_hidden_channels

_STYLE_OPTIONS = ("style", "stride_in_1x1", "stem_pool_ceil")  # setting style decides the other two


def create_model(name: str, *, pretrained: Any = None, **overrides: Any) -> nn.Module:
    """Build registered model `name` (`backbones.list_models()`) with `overrides` of its options
    (`backbones.model_options(name)`); `pretrained` (a path, URL or state dict) is loaded through `load_pretrained`."""
    model = build_model(name, **overrides)
    if pretrained is not None:
        load_pretrained(model, pretrained)
    return model


def create_pretrained(name: str | None, source: Any, **kwargs: Any) -> nn.Module:
    """Build registered model `name` configured as the checkpoint needs, and load it (see `build_pretrained`).

    From the weights: Caffe-style stride and stem pool (Cadene/legacy release), SE bias and SE width rounding
    (se_divisor), number of classes; from our own checkpoints, the recorded architecture (`name=None` takes
    the recorded model name). Explicit model options win, and a conflicting one is refused by the load.
    """
    return build_pretrained(name, source, **kwargs)[0]


def build_pretrained(
    name: str | None,
    source: Any,
    *,
    strict: bool = True,
    map_location: Any = "cpu",
    trusted: bool = False,
    format: str | None = None,
    ema: bool = False,
    prefix: str | None = None,
    allow_nonfinite: bool = False,
    **overrides: Any,
) -> tuple[nn.Module, LoadReport, str, dict]:
    """`create_pretrained`, also returning the report, the model name and the options it was built with.

    `strict`, `map_location`, `trusted`, `format`, `ema`, `prefix` and `allow_nonfinite` are `load_pretrained`'s;
    `overrides` are model options on top of what the checkpoint needs.
    """
    checkpoint = read_checkpoint(source, map_location=map_location, trusted=trusted)
    record = checkpoint.record
    if name is None:
        if not record:
            raise ValueError(f"{checkpoint.path} does not record its architecture: pass the model name")
        name = record["model"]
    options = dict(record["options"]) if record and record.get("model") == name and format is None else {}
    options.update(overrides)
    probe = meta_model(*model_config(name, **options))
    sel = select_weights(checkpoint, probe.state_dict(), format=format, ema=ema, prefix=prefix)
    derived = _options_from_weights(name, sel, model_geometry(probe), options)
    options = {**options, **{k: v for k, v in derived.items() if not _overridden(k, overrides)}}
    model = build_model(name, **options)
    # the weights were chosen on the probe: the built model differs in options only, never in key names
    report = load_selection(model, checkpoint, sel, strict=strict, allow_nonfinite=allow_nonfinite)
    return model, report, name, options


def _overridden(option: str, overrides: Mapping[str, Any]) -> bool:
    """Whether the caller set `option` (setting style decides stride_in_1x1 and stem_pool_ceil too)."""
    return option in overrides or ("style" in overrides and option in _STYLE_OPTIONS)


def _options_from_weights(name: str, sel: Selection, probe_geometry: dict, options: dict) -> dict:
    """Options the model `name` (built with flat `options`, geometry `probe_geometry`) needs for these weights."""
    built = {**model_options(name), **options}
    needed = {k: v for k, v in sel.geometry.items() if k in probe_geometry and probe_geometry[k] != v}
    options = {k: v for k, v in as_options(needed).items() if k in built}
    weights = sel.state_dict
    if has_se(weights) and "se_bias" in built:
        options["se_bias"] = any(SE_FC1_BIAS.search(k) for k in weights)
    if has_se(weights) and "se_divisor" in built:
        shapes = [v.shape for k, v in weights.items() if SE_FC1_WEIGHT.search(k)]
        for divisor in (built["se_divisor"], 1, 8):
            if all(se_hidden_channels(s[1], built["se_reduction"], divisor) == s[0] for s in shapes):
                options["se_divisor"] = divisor
                break
    if "num_classes" in built and f"{CLASSIFIER}weight" in weights:
        options["num_classes"] = weights[f"{CLASSIFIER}weight"].shape[0]
    return {k: v for k, v in options.items() if built[k] != v}


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
    allow_nonfinite: bool = False,
    options: Mapping[str, Any] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    detectron2_prefix: str = DETECTRON2_PREFIX,
) -> LoadReport:
    """Load `src` into model `arch` (configured as the weights need, `options` on top) and write it as `to`.

    `to` defaults from the suffix of `dst`: .pkl -> "detectron2", else "ours". The preprocessing recorded in an
    `src` of ours carries over; otherwise the ImageNet RGB defaults, with `preprocessing` on top.
    """
    dst = Path(dst)
    to = to or next((f for f, (suffix, _) in OUTPUT_SUFFIXES.items() if suffix == dst.suffix), "ours")
    if to not in CHECKPOINT_FORMATS:
        raise ValueError(f"unknown output format {to!r}; choose one of {', '.join(CHECKPOINT_FORMATS)}")
    checked_path(dst, to)  # before the (slow) load
    checkpoint = read_checkpoint(src, trusted=trusted)
    model, report, name, used = build_pretrained(
        arch,
        checkpoint,
        format=from_format,
        ema=ema,
        prefix=prefix,
        allow_nonfinite=allow_nonfinite,
        **dict(options or {}),
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
