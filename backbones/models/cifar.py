"""The CIFAR networks of Tables 4-5: pre-activation ResNet-110 / ResNet-164 (He et al., "Identity Mappings in
Deep Residual Networks") and WRN-16-8 (Zagoruyko and Komodakis), each with or without SE on the residual branch.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from .options import STAGES, SEOptions, check_choice
from .resnet import conv1x1, conv3x3, he_init
from .se import se_block


class _PreActUnit(nn.Module):
    """Shared wiring of a pre-activation unit: branch(relu(bn1(x))) [+SE] + shortcut.

    Subclasses define `branch(pre)`, which calls `self.drop` before its last conv (WRN's dropout).
    """

    def _init_unit(self, in_ch: int, out_ch: int, stride: int, se_layer, drop_rate: float) -> None:
        self.drop_rate = float(drop_rate)  # dropout takes a float, and torch.jit.script holds it to that
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = conv1x1(in_ch, out_ch, stride) if stride != 1 or in_ch != out_ch else None
        self.se = se_layer(out_ch) if se_layer is not None else None

    def drop(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(x, p=self.drop_rate, training=self.training) if self.drop_rate > 0 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        # the projection shares the pre-activation (identity-mappings paper); an identity shortcut keeps x
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        out = self.branch(pre)
        if self.se is not None:
            out = self.se(out)
        return out + shortcut


class PreActBlock(_PreActUnit):
    """Pre-activation basic block: BN-ReLU-3x3, BN-ReLU-3x3 [+SE], plus shortcut. Also the WRN block."""

    def __init__(self, in_ch: int, out_ch: int, *, stride: int = 1, se_layer=None, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = conv3x3(in_ch, out_ch, stride)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = conv3x3(out_ch, out_ch)
        self._init_unit(in_ch, out_ch, stride, se_layer, drop_rate)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn2(self.conv1(x)))
        return self.conv2(self.drop(out))


class PreActBottleneck(_PreActUnit):
    """Pre-activation bottleneck: BN-ReLU-1x1, BN-ReLU-3x3, BN-ReLU-1x1 [+SE], plus shortcut (ResNet-164)."""

    def __init__(self, in_ch: int, out_ch: int, *, stride: int = 1, se_layer=None, drop_rate: float = 0.0):
        super().__init__()
        width = out_ch // 4
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = conv1x1(in_ch, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn3 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, out_ch)
        self._init_unit(in_ch, out_ch, stride, se_layer, drop_rate)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn2(self.conv1(x)))
        out = self.relu(self.bn3(self.conv2(out)))
        return self.conv3(self.drop(out))


BLOCKS = {"basic": PreActBlock, "bottleneck": PreActBottleneck}


class CifarResNet(nn.Module):
    """Pre-activation ResNet / Wide ResNet for 32x32 inputs. (N, 3, 32, 32) -> logits (N, num_classes).

    Three stages of `depth_per_stage` blocks with `widths` output channels at strides 1, 2, 4;
    `forward_features(x)` returns {"res2", "res3", "res4"} (the last one after the final BN-ReLU).
    `drop_rate`: dropout before the last conv of every block's branch (WRN's dropout between the convs).
    `se`: the SE block on every residual branch (reduction, squeeze, gate and bias apply), None for no SE.
    """

    se_fields = ("reduction", "squeeze", "gate", "bias")  # the SE options these networks have

    def __init__(
        self,
        *,
        block: str = "basic",
        depth_per_stage: int = 18,
        widths: tuple[int, int, int] = (16, 32, 64),
        stem_width: int = 16,
        num_classes: int = 10,
        se: SEOptions | None = None,
        drop_rate: float = 0.0,
        in_chans: int = 3,
    ):
        super().__init__()
        block_cls = BLOCKS[check_choice("block", block, BLOCKS)]
        if se is not None and (se.placement, se.stages, se.divisor) != ("standard", STAGES, 1):
            raise ValueError(
                "the CIFAR networks put SE on every residual branch: placement, stages and divisor are fixed"
            )
        se_layer = partial(se_block, options=se) if se is not None else None
        self.arch = {"block": block, "se": se}  # what the loader checks weights against
        self.conv1 = conv3x3(in_chans, stem_width)
        in_ch = stem_width
        self.feature_info = []  # no annotation: torch.jit.script warns on an annotated empty list
        for i, out_ch in enumerate(widths):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(depth_per_stage):
                blocks.append(
                    block_cls(in_ch, out_ch, stride=stride if j == 0 else 1, se_layer=se_layer, drop_rate=drop_rate)
                )
                in_ch = out_ch
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.feature_info.append({"name": f"res{i + 2}", "channels": out_ch, "stride": 2**i})
        self.bn = nn.BatchNorm2d(in_ch)
        self.relu = nn.ReLU(inplace=True)
        self.num_features = in_ch
        self.reset_classifier(num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        he_init(self)

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(N, 3, 32, 32) -> {"res2": (N, C, 32, 32), "res3": (N, 2C, 16, 16), "res4": (N, 4C, 8, 8)}."""
        res2 = self.layer1(self.conv1(x))  # spelt out stage by stage: torch.jit.script reads no feature_info
        res3 = self.layer2(res2)
        # pre-activation nets end with the BN-ReLU of the last stage
        return {"res2": res2, "res3": res3, "res4": self.relu(self.bn(self.layer3(res3)))}

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x)["res4"])
