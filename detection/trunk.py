"""What both engines' backbone adapters share: the one ResNet trunk of `backbones`, held by composition.

Each adapter (`detection.detectron2.backbone.SEResNet`, `detection.mmdet.backbone.SEResNet`) is its engine's
backbone class, gives itself the trunk with `backbones.models.resnet.build_trunk(self, num_stages=..., ...)`
(stem and stages directly under it: conv1, bn1, layer1.0.se.fc1, ...), and uses the helpers here:

- `depth_geometry`: block type and stage depths of a ResNet depth (both engines configure depth, not layers);
- `trunk_parts` / `forward_trunk`: the freezing units (stem, res2, ...) and the forward pass over the stages built;
- `imagenet_weights`: an ImageNet checkpoint through the common loader into the adapter's own tensor names;
- `config_hint`: the options an `OptionMismatchError` names, as the engine's own config keys and values.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from itertools import chain
from typing import Any

import torch
from torch import nn

from backbones import LoadReport, ResNet, load_pretrained, model_options
from backbones.models.resnet import forward_stem

DEPTHS = (18, 34, 50, 101, 152)


def depth_geometry(depth: int, key: str = "depth") -> dict[str, Any]:
    """{"block", "layers"} of the registry's resnet{depth}; a ValueError naming the config `key` otherwise."""
    if depth not in DEPTHS:
        raise ValueError(f"{key}={depth} is not one of {', '.join(map(str, DEPTHS))}")
    options = model_options(f"resnet{depth}")
    return {"block": options["block"], "layers": tuple(options["layers"])}


def depth_of(layers: tuple[int, ...], block: str) -> int | None:
    """The ResNet depth with these stage depths and block type, None when no registered depth has them."""
    return next((d for d in DEPTHS if depth_geometry(d) == {"block": block, "layers": tuple(layers)}), None)


def trunk_parts(trunk: nn.Module) -> list[list[str]]:
    """Names of the trunk's children by freezing unit: [[stem modules], ["layer1"], ["layer2"], ...] (stem, res2...)."""
    layers = [f"layer{i + 1}" for i in range(len(trunk.feature_info))]
    stem = [name for name, _ in trunk.named_children() if name not in layers]
    return [stem, *([name] for name in layers)]


def forward_trunk(trunk: nn.Module, x: torch.Tensor, names: Collection[str]) -> dict[str, torch.Tensor]:
    """(N, C, H, W) -> {"res2": (N, C2, H/4, W/4), ...}: the stem, then every stage built, keeping `names`."""
    x = forward_stem(trunk, x)
    features = {}
    for i, info in enumerate(trunk.feature_info):
        x = getattr(trunk, f"layer{i + 1}")(x)
        if info["name"] in names:
            features[info["name"]] = x
    return features


def imagenet_weights(
    trunk: nn.Module,
    source: Any,
    *,
    norm_layer: Callable[[int], nn.Module] | None = None,
    load: Callable[..., LoadReport] = load_pretrained,
    **loader_options: Any,
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """An ImageNet checkpoint's tensors for `trunk`, under the trunk's own module names, and the load report.

    The checkpoint is loaded, all or nothing, into the whole ImageNet network the trunk was built as (`trunk.arch`,
    four stages, plain BatchNorm as it was trained, or `norm_layer`'s norms for weights trained with another)
    by `load(network, source, **loader_options)`, by default `backbones.load_pretrained` (an engine passes its
    own conventions on top of it), which checks names, shapes and the geometry no shape shows; whatever the
    engine's norm layers and the stages the detector keeps. Raises the loader's `CheckpointError` (an
    `OptionMismatchError` names the options to set).
    """
    with torch.device("meta"):
        twin = ResNet(num_classes=0, **trunk.arch, **({"norm_layer": norm_layer} if norm_layer else {}))
    twin.to_empty(device="cpu")
    report = load(twin, source, **loader_options)
    # module names, not state_dict() keys: an engine may rename those on the way out (mmdet's gn1 for our bn1)
    own = {name for name, _ in chain(trunk.named_parameters(), trunk.named_buffers())}
    loaded = twin.state_dict()
    return {k: loaded[k] for k in report.loaded if k in own}, report


def config_hint(options: Mapping[str, Any], keys: Mapping[str, str], block: str, *, where: str, assign: str) -> str:
    """The config keys to set for the flat options an `OptionMismatchError` names (`error.options`), as text.

    `keys` maps flat option names (`se_reduction`, `layers`, ...) to the engine's config keys; `layers` is
    given as the ResNet depth with those stage depths. Each setting reads `key{assign}value`, values spelt as
    both engines' command lines read them: True, 8 (not 8.0: a config's int refuses a float), [3,4]. An option
    no key of `where` sets is named as the loader names it.
    """
    settings, unmapped = [], []
    for name, value in options.items():
        if name == "layers":
            value = depth_of(value, block)
        if name in keys and value is not None:
            settings.append(f"{keys[name]}{assign}{config_value(value)}")
        else:
            unmapped.append(f"{name}={options[name]!r}")
    hint = f"\nIn {where} set: {' '.join(settings)}" if settings else ""
    return hint + (f"\nNo key of {where} sets {', '.join(unmapped)}" if unmapped else "")


def config_value(value: Any) -> str:
    """`value` as a config override spells it: 8 for 8.0, [3,4] for (3, 4)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, tuple | list):
        return f"[{','.join(config_value(v) for v in value)}]"
    return str(value)
