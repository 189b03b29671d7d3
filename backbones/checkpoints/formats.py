"""Key schemes of the ImageNet checkpoints other projects publish, mapped onto our parameter names.

Our names are torchvision's plus timm's `se.fc1` / `se.fc2` (see `backbones.models.resnet`), so torchvision and timm
`seresnet*` weights need no renaming. The other schemes (`../shared/docs/formats.md`):

- cadene: Cadene pretrainedmodels = timm `legacy_*`, the port of the official Caffe SENet weights.
  `layer0.conv1` (SENet-154: `layer0.conv1..3`), `layerX.Y.se_module.fc1/fc2`, `last_linear`.
- mmpretrain: `backbone.` prefix, `se_layer.conv1.conv` / `se_layer.conv2.conv` (older releases:
  `se_layer.conv1` / `se_layer.conv2`), classifier `head.fc`.
- moskomule (senet.pytorch): `se.fc.0` / `se.fc.2` as Linear layers ([out, in], no bias since late 2018).

A scheme also says what the weights need from the model beyond names and shapes: the stride position and
stem pool of the block style (invisible in the weights) and the SE function (squeeze and gate).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

SCHEMES_DOC = {
    "ours": "this suite's own names (and geometry recorded beside the weights, or the model's own)",
    "torchvision": "torchvision ResNet / ResNeXt (also timm's plain resnet*)",
    "timm": "timm seresnet* / seresnext*",
    "cadene": "Cadene pretrainedmodels / timm legacy_se* (Caffe-style port of the official weights)",
    "mmpretrain": "mmpretrain / mmcls SEResNet, SEResNeXt, ResNet",
    "moskomule": "moskomule senet.pytorch (Linear-form SE)",
}
SCHEMES = tuple(SCHEMES_DOC)


@dataclass(frozen=True)
class KeyScheme:
    """How one project names its parameters: a signature to recognise it and the renames onto our names."""

    name: str
    signature: re.Pattern | None
    renames: tuple[tuple[re.Pattern, str], ...] = ()
    caffe_release: bool = False  # the Caffe-style geometry: ceil-mode stem pool, stride in the 1x1 of SE-ResNet

    def map_key(self, key: str) -> str:
        for pattern, replacement in self.renames:
            key = pattern.sub(replacement, key)
        return key

    def map_tensor(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """Our `key`'s tensor from the source tensor: Linear-form SE weights [o, i] become 1x1 convs [o, i, 1, 1]."""
        if _SE_FC_WEIGHT.search(key) and tensor.ndim == 2:
            return tensor[:, :, None, None]
        return tensor


def _renames(*pairs: tuple[str, str]) -> tuple[tuple[re.Pattern, str], ...]:
    return tuple((re.compile(p), r) for p, r in pairs)


_SE = r"\.se(_3x3)?\."  # a block's SE module: `se`, or `se_3x3` for the "3x3" placement
_SE_KEY = re.compile(_SE)
_SE_FC_WEIGHT = re.compile(_SE + r"fc[12]\.weight$")
SE_FC1_WEIGHT = re.compile(_SE + r"fc1\.weight$")
SE_FC1_BIAS = re.compile(_SE + r"fc1\.bias$")

_SCHEMES: dict[str, KeyScheme] = {
    "cadene": KeyScheme(
        "cadene",
        re.compile(r"^(layer0\.|last_linear\.)|\.se_module\."),
        _renames((r"^layer0\.", ""), (r"\.se_module\.", ".se."), (r"^last_linear\.", "fc.")),
        caffe_release=True,
    ),
    "mmpretrain": KeyScheme(
        "mmpretrain",
        re.compile(r"^backbone\.(?!bottom_up\.)|^head\.fc\.|\.se_layer\."),
        _renames(
            (r"^backbone\.", ""),
            (r"\.se_layer\.conv1\.(conv\.)?", ".se.fc1."),
            (r"\.se_layer\.conv2\.(conv\.)?", ".se.fc2."),
            (r"^head\.fc\.", "fc."),
        ),
    ),
    "moskomule": KeyScheme(
        "moskomule",
        re.compile(r"\.se\.fc\.[02]\."),
        _renames((r"\.se\.fc\.0\.", ".se.fc1."), (r"\.se\.fc\.2\.", ".se.fc2.")),
    ),
    "timm": KeyScheme("timm", re.compile(r"\.se\.fc[12]\.")),
    "torchvision": KeyScheme("torchvision", None),
    "ours": KeyScheme("ours", None),
}
_DETECTION_ORDER = ("cadene", "mmpretrain", "moskomule", "timm")


def get_scheme(name: str) -> KeyScheme:
    if name not in _SCHEMES:
        raise ValueError(f"unknown checkpoint format {name!r}; known formats: {', '.join(SCHEMES)}")
    return _SCHEMES[name]


def detect_scheme(keys: Iterable[str]) -> KeyScheme:
    """The first scheme whose signature some key matches; torchvision names (= ours) when none does."""
    keys = list(keys)
    for name in _DETECTION_ORDER:
        scheme = _SCHEMES[name]
        if any(scheme.signature.search(k) for k in keys):
            return scheme
    return _SCHEMES["torchvision"]


def map_state_dict(state_dict: Mapping[str, torch.Tensor], scheme: KeyScheme) -> dict[str, torch.Tensor]:
    """Rename every key (and reshape Linear-form SE weights) from `scheme` onto our names."""
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        new = scheme.map_key(key)
        if new in mapped:
            raise ValueError(f"keys collide after mapping from the {scheme.name} scheme: several map to {new!r}")
        mapped[new] = scheme.map_tensor(new, tensor)
    return mapped


def is_se_key(key: str) -> bool:
    return _SE_KEY.search(key) is not None


def has_se(keys: Iterable[str]) -> bool:
    return any(is_se_key(k) for k in keys)


def source_geometry(scheme: KeyScheme, state_dict: Mapping[str, torch.Tensor]) -> dict:
    """What the weights (already in our names) need from the model that no shape shows.

    Every published scheme pools the stem with padding and puts the stride in the 3x3 conv, except the Caffe
    release: ceil-mode unpadded stem pool, and in SE-ResNet bottlenecks (groups 1) the stride in the first 1x1.
    Its SE-ResNeXt and SENet-154 bottlenecks keep the stride in the grouped 3x3. All published SE blocks
    average-pool, gate with a sigmoid and sit on the residual branch before the addition.
    Our own plain-named checkpoints carry no such promise: the scheme "ours" trusts the model.
    """
    if scheme.name == "ours":
        return {}
    geometry: dict = {"stem_pool_ceil": scheme.caffe_release}
    conv1, conv2 = state_dict.get("layer1.0.conv1.weight"), state_dict.get("layer1.0.conv2.weight")
    if "layer1.0.conv3.weight" in state_dict and conv1 is not None and conv2 is not None:
        grouped = conv2.shape[1] != conv1.shape[0]
        geometry["stride_in_1x1"] = scheme.caffe_release and not grouped
    if has_se(state_dict):
        geometry.update(se_squeeze="avg", se_gate="sigmoid", se_placement="standard")
    return geometry


def unsupported(scheme: KeyScheme, state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """Why these weights cannot be loaded faithfully into any of our models, or None."""
    if scheme.caffe_release and "layer1.0.conv2.weight" in state_dict and "layer1.0.conv3.weight" not in state_dict:
        return (
            "these are timm legacy_seresnet18/34 (Cadene-layout) basic-block weights; that block applies a ReLU "
            "before its SE and residual add, which our BasicBlock does not, so no option of ours computes the "
            "same function. Use timm seresnet18/34 weights (they load into se_resnet18/34 with se_divisor=8)."
        )
    return None
