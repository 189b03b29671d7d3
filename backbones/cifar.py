"""The CIFAR networks of Tables 4-5: pre-activation ResNet-110 / ResNet-164 (He et al., "Identity Mappings in
Deep Residual Networks") and WRN-16-8 (Zagoruyko and Komodakis), each with or without SE on the residual branch.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from .resnet import conv1x1, conv3x3
from .se import SqueezeExcite


class PreActBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-3x3, BN-ReLU-3x3 [+SE], plus shortcut. Also the WRN block."""

    def __init__(self, in_ch: int, out_ch: int, *, stride: int = 1, se_layer=None, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = conv3x3(in_ch, out_ch, stride)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.drop_rate = drop_rate
        self._init_shortcut(in_ch, out_ch, stride, se_layer)

    def _init_shortcut(self, in_ch: int, out_ch: int, stride: int, se_layer) -> None:
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = conv1x1(in_ch, out_ch, stride) if stride != 1 or in_ch != out_ch else None
        self.se = se_layer(out_ch) if se_layer is not None else None

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.relu(self.bn2(out))
        if self.drop_rate > 0:
            out = nn.functional.dropout(out, p=self.drop_rate, training=self.training)
        return self.conv2(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        # the projection shares the pre-activation (identity-mappings paper); an identity shortcut keeps x
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        out = self.branch(pre)
        if self.se is not None:
            out = self.se(out)
        return out + shortcut


class PreActBottleneck(PreActBlock):
    """Pre-activation bottleneck: BN-ReLU-1x1, BN-ReLU-3x3, BN-ReLU-1x1 [+SE], plus shortcut (ResNet-164)."""

    def __init__(self, in_ch: int, out_ch: int, *, stride: int = 1, se_layer=None, drop_rate: float = 0.0):
        nn.Module.__init__(self)
        width = out_ch // 4
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = conv1x1(in_ch, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn3 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, out_ch)
        self.drop_rate = drop_rate
        self._init_shortcut(in_ch, out_ch, stride, se_layer)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn2(self.conv1(x)))
        out = self.relu(self.bn3(self.conv2(out)))
        return self.conv3(out)


class CifarResNet(nn.Module):
    """Pre-activation ResNet / Wide ResNet for 32x32 inputs. (N, 3, 32, 32) -> logits (N, num_classes).

    Three stages of `depth_per_stage` blocks with `widths` output channels at strides 1, 2, 4;
    `forward_features(x)` returns {"res2", "res3", "res4"} (the last one after the final BN-ReLU).
    """

    def __init__(
        self,
        *,
        block: str = "basic",
        depth_per_stage: int = 18,
        widths: tuple[int, int, int] = (16, 32, 64),
        stem_width: int = 16,
        num_classes: int = 10,
        se: bool = False,
        se_reduction: float = 16,
        se_squeeze: str = "avg",
        se_gate: str = "sigmoid",
        se_bias: bool = True,
        drop_rate: float = 0.0,
        in_chans: int = 3,
    ):
        super().__init__()
        block_cls = {"basic": PreActBlock, "bottleneck": PreActBottleneck}.get(block)
        if block_cls is None:
            raise ValueError(f"block={block!r} is not one of 'basic', 'bottleneck'")
        se_layer = (
            partial(SqueezeExcite, reduction=se_reduction, squeeze=se_squeeze, gate=se_gate, bias=se_bias)
            if se
            else None
        )
        self.conv1 = conv3x3(in_chans, stem_width)
        in_ch = stem_width
        self.feature_info: list[dict] = []
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
        self.num_classes = num_classes
        self.fc = nn.Linear(in_ch, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(N, 3, 32, 32) -> {"res2": (N, C, 32, 32), "res3": (N, 2C, 16, 16), "res4": (N, 4C, 8, 8)}."""
        x = self.conv1(x)
        features = {}
        layers = (self.layer1, self.layer2, self.layer3)
        for idx, (info, layer) in enumerate(zip(self.feature_info, layers, strict=True)):
            x = layer(x)
            if idx == len(layers) - 1:
                x = self.relu(self.bn(x))
            features[info["name"]] = x
        return features

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x)["res4"])
