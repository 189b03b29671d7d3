"""One registry of model names: `build_model(name, **overrides)`, `list_models()`, `model_options(name)`."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .cifar import CifarResNet
from .options import FLAT_PREFIX, SEOptions
from .resnet import ResNet

_MODELS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {}


@dataclass(frozen=True)
class ModelConfig:
    """How a model was built, recorded on it as `model.model_cfg` (timm keeps `pretrained_cfg` the same way):
    `build_model(name, **options)` builds it again. Options are flat (`se_reduction=8`), as configs spell them."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


def register(name: str, cls: type[nn.Module], **defaults: Any) -> None:
    """Register `name` as `cls(**defaults)`; `build_model` lets callers override any default."""
    _MODELS[name] = (cls, defaults)


def list_models() -> list[str]:
    return sorted(_MODELS)


def model_options(name: str) -> dict[str, Any]:
    """Every option `build_model(name, ...)` accepts (flat: `se`, `se_reduction`, ...), with its default here."""
    cls, defaults = _lookup(name)
    options = {}
    for fn in (cls.__init__, getattr(cls, "trunk_builder", None)):
        if fn is not None:
            params = inspect.signature(fn).parameters.values()
            options.update({p.name: p.default for p in params if p.kind == p.KEYWORD_ONLY})
    options.pop("num_stages", None)  # the detection backbones' concern
    se_fields = getattr(cls, "se_fields", SEOptions.names())
    options.update({k: v for k, v in SEOptions().to_flat().items() if k == "se" or k[len(FLAT_PREFIX) :] in se_fields})
    options["se"] = False
    return {**options, **defaults}


def model_config(name: str, **overrides: Any) -> tuple[type[nn.Module], dict[str, Any]]:
    """The class and the constructor keyword arguments `build_model(name, **overrides)` builds it with
    (the flat SE options folded into one `SEOptions`, or None)."""
    cls, defaults = _lookup(name)
    valid = model_options(name)
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for model {name!r}; valid options: {', '.join(sorted(valid))}")
    flat = {**defaults, **overrides}
    kwargs = {k: v for k, v in flat.items() if k != "se" and not k.startswith(FLAT_PREFIX)}
    kwargs["se"] = SEOptions.from_flat(flat, getattr(cls, "se_fields", None))
    return cls, kwargs


def build_model(name: str, **overrides: Any) -> nn.Module:
    """Build registered model `name` (random init), recording how in `model.model_cfg`."""
    cls, kwargs = model_config(name, **overrides)
    model = cls(**kwargs)
    model.model_cfg = ModelConfig(name, dict(overrides))
    return model


def _lookup(name: str) -> tuple[type[nn.Module], dict[str, Any]]:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return _MODELS[name]


def _register_all() -> None:
    basic = {"block": "basic"}
    depths = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
    for depth, layers in depths.items():
        kind = basic if depth < 50 else {}
        register(f"resnet{depth}", ResNet, layers=layers, **kind)
        register(f"se_resnet{depth}", ResNet, layers=layers, se=True, **kind)
    for depth in (50, 101):
        x32 = {"layers": depths[depth], "groups": 32, "width_per_group": 4}
        register(f"resnext{depth}_32x4d", ResNet, **x32)
        register(f"se_resnext{depth}_32x4d", ResNet, se=True, **x32)
    # SENet-154 (appendix): SE + 64x4d ResNeXt-152, three 3x3 stem convs, 3x3 stride-2 projections,
    # halved first 1x1, dropout 0.2 before the classifier; the official model pools in ceil mode.
    register(
        "senet154",
        ResNet,
        layers=depths[152],
        groups=64,
        width_per_group=4,
        se=True,
        deep_stem=True,
        bottleneck_1x1_ratio=0.5,
        downsample_kernel=3,
        drop_rate=0.2,
        stem_pool_ceil=True,
    )
    # CIFAR (Tables 4-5): depth 110 = 6n+2 with basic blocks, 164 = 9n+2 with bottlenecks; WRN-16-8.
    cifar = {
        "cifar_resnet110": {"block": "basic", "depth_per_stage": 18, "widths": (16, 32, 64)},
        "cifar_resnet164": {"block": "bottleneck", "depth_per_stage": 18, "widths": (64, 128, 256)},
        "cifar_wrn16_8": {"block": "basic", "depth_per_stage": 2, "widths": (128, 256, 512)},
    }
    for name, kw in cifar.items():
        register(name, CifarResNet, **kw)
        register(name.replace("cifar_", "cifar_se_"), CifarResNet, se=True, **kw)


_register_all()
