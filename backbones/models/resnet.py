"""ResNet, ResNeXt and SENet (ImageNet geometry) with the SE block plugged into the blocks.

One class covers every variant of the paper: plain or SE, basic or bottleneck blocks, grouped 3x3 convs
(ResNeXt), the SENet-154 stem and projections, the SE placements of Tables 14-15, the SE stages of Table 13,
and both block styles (PyTorch: stride in the 3x3 conv; Caffe: stride in the first 1x1 conv with a ceil-mode,
unpadded stem max-pool, as the official weights and the paper's GFLOPs).

Parameter names follow torchvision (conv1, bn1, layer1.0.conv1, downsample.0, fc) and timm (se.fc1, se.fc2),
so their checkpoints load by name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn

from .options import STAGES, SEOptions, check_choice
from .se import SqueezeExcite, se_block

STYLES = ("pytorch", "caffe")
STAGE_NAMES = tuple(f"res{s}" for s in STAGES)
STAGE_STRIDES = (4, 8, 16, 32)

NormLayer = Callable[[int], nn.Module]
SELayer = Callable[[int], nn.Module]


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


def he_init(model: nn.Module) -> None:
    """He (Kaiming, fan-out) init for every conv, zero conv biases, norms to identity (paper, Section 5.1)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm) and m.weight is not None:  # affine=False: no weights
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class _ResidualUnit(nn.Module):
    """Shared wiring of a residual unit: relu(branch(x) + shortcut(x)) with SE where `se_placement` puts it.

    Subclasses define `branch(x)`, which applies `self.se_3x3` when the placement is "3x3".
    """

    def _init_unit(
        self, in_ch: int, out_ch: int, se_layer: SELayer | None, se_placement: str, downsample, branch_se_ch: int
    ):
        self.downsample = downsample
        self.relu = nn.ReLU(inplace=True)
        self.se_placement = se_placement
        self.se = None
        self.se_3x3 = None
        if se_layer is None:
            return
        if se_placement == "3x3":
            self.se_3x3 = se_layer(branch_se_ch)
        else:
            self.se = se_layer(in_ch if se_placement == "pre" else out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        # `self.se is None` and `isinstance` are decided when torch.jit.script compiles the unit: it compiles
        # only the calls the unit's SE module can take
        if self.se is None:
            out = self.branch(x)
            out += shortcut  # in place, as torchvision: the branch output is this unit's own tensor
            return self.relu(out)
        placement = self.se_placement
        if placement == "pre":
            x = self.se(x)
        out = self.branch(x)
        if placement == "standard" and isinstance(self.se, SqueezeExcite):
            out = self.se(out, shortcut)  # the SE scale and the residual sum in one pass
        else:
            if placement == "standard":
                out = self.se(out)
            elif placement == "identity":
                shortcut = self.se(shortcut)
            out += shortcut
        out = self.relu(out)
        if placement == "post":
            out = self.se(out)
        return out

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.last_norm().weight)


class BasicBlock(_ResidualUnit):
    """Basic block: 3x3, 3x3 [+SE], (N, Cin, H, W) -> (N, Cout, H/stride, W/stride)."""

    expansion = 1

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        stride: int = 1,
        width: int | None = None,
        groups: int = 1,
        stride_in_1x1: bool = False,
        downsample: nn.Module | None = None,
        se_layer: SELayer | None = None,
        se_placement: str = "standard",
        norm_layer: NormLayer = nn.BatchNorm2d,
        width_1x1: int | None = None,
    ):
        super().__init__()
        if groups != 1:
            raise ValueError("BasicBlock supports groups=1 only (ResNeXt uses bottleneck blocks)")
        self.conv1 = conv3x3(in_ch, out_ch, stride)
        self.bn1 = norm_layer(out_ch)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.bn2 = norm_layer(out_ch)
        self._init_unit(in_ch, out_ch, se_layer, se_placement, downsample, out_ch)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return out if self.se_3x3 is None else self.se_3x3(out)

    def last_norm(self) -> nn.Module:
        return self.bn2


class Bottleneck(_ResidualUnit):
    """Bottleneck: 1x1, 3x3 (grouped), 1x1 [+SE], (N, Cin, H, W) -> (N, Cout, H/stride, W/stride).

    `width` is the 3x3 conv's channel count; `width_1x1` the first 1x1's output (SENet-154 halves it).
    """

    expansion = 4

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        stride: int = 1,
        width: int | None = None,
        groups: int = 1,
        stride_in_1x1: bool = False,
        downsample: nn.Module | None = None,
        se_layer: SELayer | None = None,
        se_placement: str = "standard",
        norm_layer: NormLayer = nn.BatchNorm2d,
        width_1x1: int | None = None,
    ):
        super().__init__()
        width = width or out_ch // self.expansion
        width_1x1 = width_1x1 or width
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = conv1x1(in_ch, width_1x1, s1)
        self.bn1 = norm_layer(width_1x1)
        self.conv2 = conv3x3(width_1x1, width, s3, groups)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, out_ch)
        self.bn3 = norm_layer(out_ch)
        self._init_unit(in_ch, out_ch, se_layer, se_placement, downsample, width)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        if self.se_3x3 is not None:
            out = self.se_3x3(out)
        return self.bn3(self.conv3(out))

    def last_norm(self) -> nn.Module:
        return self.bn3


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


def resolve_style(style: str, stride_in_1x1: bool | None, stem_pool_ceil: bool | None) -> tuple[bool, bool]:
    """(stride_in_1x1, stem_pool_ceil): what `style` sets, unless given explicitly."""
    caffe = check_choice("style", style, STYLES) == "caffe"
    return (caffe if stride_in_1x1 is None else stride_in_1x1, caffe if stem_pool_ceil is None else stem_pool_ceil)


def make_stem(
    in_chans: int, stem_width: int, *, deep_stem: bool, pool_ceil: bool, norm_layer: NormLayer
) -> dict[str, nn.Module]:
    """Stem modules by name (conv1, bn1 [, conv2, bn2, conv3, bn3], relu, maxpool): (N, Cin, H, W) -> stride 4.

    The 7x7 conv, or SENet-154's three 3x3 convs (`deep_stem`, 2 x stem_width channels out); the max-pool padded,
    or unpadded in ceil mode as the Caffe-style weights. `forward_stem` runs them.
    """
    if deep_stem:
        out = stem_width * 2
        stem = {
            "conv1": conv3x3(in_chans, stem_width, 2),
            "bn1": norm_layer(stem_width),
            "conv2": conv3x3(stem_width, stem_width),
            "bn2": norm_layer(stem_width),
            "conv3": conv3x3(stem_width, out),
            "bn3": norm_layer(out),
        }
    else:
        stem = {
            "conv1": nn.Conv2d(in_chans, stem_width, 7, stride=2, padding=3, bias=False),
            "bn1": norm_layer(stem_width),
        }
    stem["relu"] = nn.ReLU(inplace=True)
    stem["maxpool"] = nn.MaxPool2d(3, stride=2, padding=0, ceil_mode=True) if pool_ceil else nn.MaxPool2d(3, 2, 1)
    return stem


def forward_stem(owner: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run the `make_stem` modules held by `owner`: (N, Cin, H, W) -> (N, C, H/4, W/4)."""
    return ResNet.stem(owner, x)


def make_stage(
    block_cls: type[_ResidualUnit],
    in_ch: int,
    planes: int,
    depth: int,
    stride: int,
    *,
    groups: int = 1,
    width_per_group: int = 64,
    bottleneck_1x1_ratio: float = 1.0,
    downsample_kernel: int = 1,
    stride_in_1x1: bool = False,
    se: SEOptions | None = None,
    se_placement: str = "standard",
    norm_layer: NormLayer = nn.BatchNorm2d,
) -> nn.Sequential:
    """`depth` blocks, the first with `stride` and a projection shortcut when the shape changes:
    (N, in_ch, H, W) -> (N, planes * expansion, H/stride, W/stride)."""
    out_ch = planes * block_cls.expansion
    width = int(planes * width_per_group / 64) * groups
    se_layer = partial(se_block, options=se) if se is not None else None
    blocks = []
    for j in range(depth):
        downsample = None
        if j == 0 and (stride != 1 or in_ch != out_ch):
            k = downsample_kernel if stride != 1 else 1
            downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, k, stride=stride, padding=k // 2, bias=False), norm_layer(out_ch)
            )
        blocks.append(
            block_cls(
                in_ch,
                out_ch,
                stride=stride if j == 0 else 1,
                width=width,
                width_1x1=int(width * bottleneck_1x1_ratio),
                groups=groups,
                stride_in_1x1=stride_in_1x1,
                downsample=downsample,
                se_layer=se_layer,
                se_placement=se_placement,
                norm_layer=norm_layer,
            )
        )
        in_ch = out_ch
    return nn.Sequential(*blocks)


def build_trunk(
    owner: nn.Module,
    *,
    num_stages: int = 4,
    block: str = "bottleneck",
    layers: Sequence[int] = (3, 4, 6, 3),
    groups: int = 1,
    width_per_group: int = 64,
    se: SEOptions | None = None,
    style: str = "pytorch",
    stride_in_1x1: bool | None = None,
    stem_pool_ceil: bool | None = None,
    deep_stem: bool = False,
    stem_width: int = 64,
    bottleneck_1x1_ratio: float = 1.0,
    downsample_kernel: int = 1,
    norm_layer: NormLayer = nn.BatchNorm2d,
    in_chans: int = 3,
) -> list[dict]:
    """Give `owner` a ResNet's stem and its first `num_stages` stages (`layer1`...), under torchvision's names.

    The one construction of the ImageNet networks: `ResNet` and both detection engines' backbones call it, so
    their parameters carry the same names. Returns the feature info of the stages built: [{"name": "res2",
    "channels": C, "stride": 4}, ...]. Sets `owner.arch`, the options resolved (style decided).
    """
    block_cls = BLOCKS[check_choice("block", block, BLOCKS)]
    check_choice("downsample_kernel", downsample_kernel, (1, 3))
    if len(layers) != 4:
        raise ValueError(f"layers must give 4 stage depths, got {tuple(layers)}")
    if not 1 <= num_stages <= 4:
        raise ValueError(f"num_stages={num_stages} must be in 1..4")
    # a basic block has no bottleneck width to widen or group: refuse rather than build a plain ResNet
    if block_cls is BasicBlock and (groups != 1 or width_per_group != 64):
        raise ValueError(
            f"basic blocks take groups=1 and width_per_group=64 only, got groups={groups} and "
            f"width_per_group={width_per_group}; wide and ResNeXt models use block='bottleneck'"
        )
    stride_in_1x1, stem_pool_ceil = resolve_style(style, stride_in_1x1, stem_pool_ceil)
    owner.arch = {
        "block": block,
        "layers": tuple(layers),
        "groups": groups,
        "width_per_group": width_per_group,
        "se": se,
        "stride_in_1x1": stride_in_1x1,
        "stem_pool_ceil": stem_pool_ceil,
        "deep_stem": deep_stem,
        "stem_width": stem_width,
        "bottleneck_1x1_ratio": bottleneck_1x1_ratio,
        "downsample_kernel": downsample_kernel,
        "in_chans": in_chans,
    }
    stem = make_stem(in_chans, stem_width, deep_stem=deep_stem, pool_ceil=stem_pool_ceil, norm_layer=norm_layer)
    for name, module in stem.items():
        owner.add_module(name, module)
    in_ch = stem_width * 2 if deep_stem else stem_width
    feature_info = []
    for i in range(num_stages):
        stage = STAGES[i]
        planes = 64 * 2**i
        layer = make_stage(
            block_cls,
            in_ch,
            planes,
            layers[i],
            1 if i == 0 else 2,
            groups=groups,
            width_per_group=width_per_group,
            bottleneck_1x1_ratio=bottleneck_1x1_ratio,
            downsample_kernel=downsample_kernel,
            stride_in_1x1=stride_in_1x1,
            se=se if se is not None and stage in se.stages else None,
            se_placement=se.placement if se is not None else "standard",
            norm_layer=norm_layer,
        )
        owner.add_module(f"layer{i + 1}", layer)
        in_ch = planes * block_cls.expansion
        feature_info.append({"name": f"res{stage}", "channels": in_ch, "stride": STAGE_STRIDES[i]})
    return feature_info


def init_trunk(owner: nn.Module, *, zero_init_last: bool = False) -> None:
    """The init of `build_trunk`'s modules (and any other under `owner`): `he_init`, then, with `zero_init_last`,
    the last norm of every residual block zeroed (each block starts as the identity)."""
    he_init(owner)
    if zero_init_last:
        for m in owner.modules():
            if isinstance(m, _ResidualUnit):
                m.zero_init_last()


class ResNet(nn.Module):
    """ImageNet-geometry ResNet / ResNeXt / SENet. (N, 3, H, W) -> logits (N, num_classes).

    Architecture options (`build_trunk`): block "basic" / "bottleneck", layers (four stage depths), groups and
    width_per_group (ResNeXt), se (`SEOptions`, None for no SE), style "pytorch" / "caffe" (or stride_in_1x1 and
    stem_pool_ceil separately), deep_stem, stem_width, bottleneck_1x1_ratio and downsample_kernel (SENet-154),
    norm_layer, in_chans. `forward_features(x)` returns {"res2".."res5": (N, C_s, H/s, W/s)} for strides 4, 8,
    16, 32; `feature_info` lists each stage's name, channels and stride. `num_classes=0` builds no classifier
    and `forward` returns the pooled (N, C_5) features.
    """

    trunk_builder = staticmethod(build_trunk)  # where the architecture options are defined (see the registry)

    def __init__(self, *, num_classes: int = 1000, drop_rate: float = 0.0, zero_init_last: bool = False, **arch):
        super().__init__()
        self.feature_info = build_trunk(self, **arch)
        self.stride_in_1x1 = self.arch["stride_in_1x1"]
        self.stem_pool_ceil = self.arch["stem_pool_ceil"]
        self.num_features = self.feature_info[-1]["channels"]
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.drop_rate = float(drop_rate)  # dropout takes a float, and torch.jit.script holds it to that
        self.fc: nn.Module = nn.Identity()
        self.reset_classifier(num_classes)
        self.init_weights(zero_init_last=zero_init_last)

    def init_weights(self, zero_init_last: bool = False) -> None:
        """He (Kaiming) init for convs, BN to identity; optionally zero the last BN of every block."""
        init_trunk(self, zero_init_last=zero_init_last)

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """The `make_stem` modules (of any owner, see `forward_stem`): (N, Cin, H, W) -> (N, C, H/4, W/4)."""
        x = self.relu(self.bn1(self.conv1(x)))
        if hasattr(self, "conv3"):  # the deep stem; torch.jit.script decides it when compiling
            x = self.relu(self.bn2(self.conv2(x)))
            x = self.relu(self.bn3(self.conv3(x)))
        return self.maxpool(x)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(N, 3, H, W) -> {"res2": (N, C2, H/4, W/4), ..., "res5": (N, C5, H/32, W/32)}."""
        res2 = self.layer1(self.stem(x))  # spelt out stage by stage: torch.jit.script reads no feature_info
        res3 = self.layer2(res2)
        res4 = self.layer3(res3)
        return {"res2": res2, "res3": res3, "res4": res4, "res5": self.layer4(res4)}

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C5, h, w) -> (N, num_classes), or the pooled (N, C5) when there is no classifier."""
        x = self.global_pool(x).flatten(1)
        if self.drop_rate > 0:
            x = nn.functional.dropout(x, p=self.drop_rate, training=self.training)
        return self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x)["res5"])
