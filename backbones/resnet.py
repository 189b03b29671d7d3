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

from .se import SqueezeExcite, check_choice

STYLES = ("pytorch", "caffe")
PLACEMENTS = ("standard", "pre", "post", "identity", "3x3")
STAGES = (2, 3, 4, 5)
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
        placement = self.se_placement if self.se is not None else None
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
            out += shortcut  # in place, as torchvision: the branch output is this unit's own tensor
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


class ResNet(nn.Module):
    """ImageNet-geometry ResNet / ResNeXt / SENet. (N, 3, H, W) -> logits (N, num_classes).

    `forward_features(x)` returns {"res2".."res5": (N, C_s, H/s, W/s)} for strides 4, 8, 16, 32;
    `feature_info` lists each stage's name, channels and stride. `num_classes=0` builds no classifier and
    `forward` returns the pooled (N, C_5) features.
    """

    def __init__(
        self,
        *,
        block: str | type[_ResidualUnit] = "bottleneck",
        layers: Sequence[int] = (3, 4, 6, 3),
        groups: int = 1,
        width_per_group: int = 64,
        num_classes: int = 1000,
        se: bool = False,
        se_reduction: float = 16,
        se_squeeze: str = "avg",
        se_gate: str = "sigmoid",
        se_bias: bool = True,
        se_divisor: int = 1,
        se_placement: str = "standard",
        se_stages: Sequence[int] = STAGES,
        style: str = "pytorch",
        stride_in_1x1: bool | None = None,
        stem_pool_ceil: bool | None = None,
        deep_stem: bool = False,
        stem_width: int = 64,
        bottleneck_1x1_ratio: float = 1.0,
        downsample_kernel: int = 1,
        drop_rate: float = 0.0,
        zero_init_last: bool = False,
        norm_layer: NormLayer = nn.BatchNorm2d,
        in_chans: int = 3,
    ):
        super().__init__()
        if isinstance(block, str):
            check_choice("block", block, BLOCKS)
        check_choice("style", style, STYLES)
        check_choice("se_placement", se_placement, PLACEMENTS)
        check_choice("downsample_kernel", downsample_kernel, (1, 3))
        if len(layers) != 4:
            raise ValueError(f"layers must give 4 stage depths, got {tuple(layers)}")
        bad_stages = set(se_stages) - set(STAGES)
        if bad_stages:
            raise ValueError(f"se_stages {sorted(bad_stages)} are not among the stages {STAGES} (res2..res5)")
        caffe = style == "caffe"
        self.stride_in_1x1 = caffe if stride_in_1x1 is None else stride_in_1x1
        self.stem_pool_ceil = caffe if stem_pool_ceil is None else stem_pool_ceil
        self.deep_stem = deep_stem
        # A block class (a subclass of BasicBlock / Bottleneck) lets an engine wrap the blocks, e.g. as
        # detectron2 CNNBlockBase in detection/, without a second copy of the stage construction.
        block_cls = BLOCKS[block] if isinstance(block, str) else block
        # a basic block has no bottleneck width to widen or group: refuse rather than build a plain ResNet
        if issubclass(block_cls, BasicBlock) and (groups != 1 or width_per_group != 64):
            raise ValueError(
                f"basic blocks take groups=1 and width_per_group=64 only, got groups={groups} and "
                f"width_per_group={width_per_group}; wide and ResNeXt models use block='bottleneck'"
            )
        se_layer = (
            partial(
                SqueezeExcite,
                reduction=se_reduction,
                squeeze=se_squeeze,
                gate=se_gate,
                bias=se_bias,
                divisor=se_divisor,
            )
            if se
            else None
        )

        stem_out = stem_width * 2 if deep_stem else stem_width
        if deep_stem:  # SENet-154: three 3x3 convs replace the 7x7
            self.conv1 = conv3x3(in_chans, stem_width, 2)
            self.bn1 = norm_layer(stem_width)
            self.conv2 = conv3x3(stem_width, stem_width)
            self.bn2 = norm_layer(stem_width)
            self.conv3 = conv3x3(stem_width, stem_out)
            self.bn3 = norm_layer(stem_out)
        else:
            self.conv1 = nn.Conv2d(in_chans, stem_out, 7, stride=2, padding=3, bias=False)
            self.bn1 = norm_layer(stem_out)
        self.relu = nn.ReLU(inplace=True)
        if self.stem_pool_ceil:
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=0, ceil_mode=True)
        else:
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)

        self.feature_info: list[dict] = []
        in_ch = stem_out
        for i, (depth, stage) in enumerate(zip(layers, STAGES, strict=True)):
            planes = 64 * 2**i
            out_ch = planes * block_cls.expansion
            width = int(planes * width_per_group / 64) * groups
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(depth):
                downsample = None
                if j == 0 and (stride != 1 or in_ch != out_ch):
                    k = downsample_kernel if stride != 1 else 1
                    downsample = nn.Sequential(
                        nn.Conv2d(in_ch, out_ch, k, stride=stride, padding=k // 2, bias=False),
                        norm_layer(out_ch),
                    )
                blocks.append(
                    block_cls(
                        in_ch,
                        out_ch,
                        stride=stride if j == 0 else 1,
                        width=width,
                        width_1x1=int(width * bottleneck_1x1_ratio),
                        groups=groups,
                        stride_in_1x1=self.stride_in_1x1,
                        downsample=downsample,
                        se_layer=se_layer if stage in se_stages else None,
                        se_placement=se_placement,
                        norm_layer=norm_layer,
                    )
                )
                in_ch = out_ch
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.feature_info.append({"name": f"res{stage}", "channels": out_ch, "stride": STAGE_STRIDES[i]})

        self.num_features = in_ch
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.drop_rate = drop_rate
        self.fc: nn.Module = nn.Identity()
        self.reset_classifier(num_classes)
        self.init_weights(zero_init_last=zero_init_last)

    def init_weights(self, zero_init_last: bool = False) -> None:
        """He (Kaiming) init for convs, BN to identity; optionally zero the last BN of every block."""
        he_init(self)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, _ResidualUnit):
                    m.zero_init_last()

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        if self.deep_stem:
            x = self.relu(self.bn2(self.conv2(x)))
            x = self.relu(self.bn3(self.conv3(x)))
        return self.maxpool(x)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(N, 3, H, W) -> {"res2": (N, C2, H/4, W/4), ..., "res5": (N, C5, H/32, W/32)}."""
        x = self.stem(x)
        features = {}
        for info, layer in zip(self.feature_info, (self.layer1, self.layer2, self.layer3, self.layer4), strict=True):
            x = layer(x)
            features[info["name"]] = x
        return features

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C5, h, w) -> (N, num_classes), or the pooled (N, C5) when there is no classifier."""
        x = self.global_pool(x).flatten(1)
        if self.drop_rate > 0:
            x = nn.functional.dropout(x, p=self.drop_rate, training=self.training)
        return self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x)["res5"])
