"""Our (SE-)ResNet as a detectron2 backbone, C4-style and with FPN.

`SEResNet` IS `backbones.ResNet` (same modules, same parameter names: `conv1`, `layer1.0.se.fc1`, ...), plus
detectron2's `Backbone` contract: `forward` returns the named features of `out_features`, `output_shape()`
their channels and strides, and `freeze(freeze_at)` freezes the stem and the first stages. Its blocks are our
`BasicBlock` / `Bottleneck` made detectron2 `CNNBlockBase`s, so they freeze (requires_grad off, BN -> FrozenBN)
the way detectron2's own blocks do. In the FPN model the ResNet is `backbone.bottom_up`, so an ImageNet state
dict of ours maps onto it by prefixing `backbone.bottom_up.` (`backbones.to_detectron2`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from detectron2.config import CfgNode
from detectron2.layers import CNNBlockBase, FrozenBatchNorm2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool

from backbones import model_options
from backbones.resnet import STAGE_NAMES, BasicBlock, Bottleneck, ResNet

NORMS = ("FrozenBN", "BN", "SyncBN", "GN")  # what detectron2's get_norm builds for a conv backbone
STEM_MODULES = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")  # conv2/3 only in the deep (SENet-154) stem


class _CNNBlock(CNNBlockBase):
    """Mixin: our residual unit, initialised as itself, with CNNBlockBase's in/out channels, stride and freeze()."""

    def __init__(self, in_ch: int, out_ch: int, *, stride: int = 1, **kwargs):
        # Our block's __init__ only: CNNBlockBase.__init__ would call the next __init__ in the MRO (our
        # block's) without its arguments. nn.Module is initialised once, by our block.
        self._unit.__init__(self, in_ch, out_ch, stride=stride, **kwargs)
        self.in_channels, self.out_channels, self.stride = in_ch, out_ch, stride


class SEBasicBlock(_CNNBlock, BasicBlock):
    """backbones.resnet.BasicBlock (3x3, 3x3 [+SE]) as a detectron2 CNNBlockBase."""

    _unit = BasicBlock


class SEBottleneckBlock(_CNNBlock, Bottleneck):
    """backbones.resnet.Bottleneck (1x1, 3x3, 1x1 [+SE]) as a detectron2 CNNBlockBase."""

    _unit = Bottleneck


CNN_BLOCKS = {"basic": SEBasicBlock, "bottleneck": SEBottleneckBlock}


class SEResNet(ResNet, Backbone):
    """backbones.ResNet as a detectron2 Backbone: (N, C, H, W) -> {name: (N, C_s, H/s, W/s)} for `out_features`.

    Stages after the last requested feature are not kept (C4: out_features ["res4"] keeps res2..res4; the res5
    of the box head is `SERes5ROIHeads`). `freeze_at` follows detectron2: 0 nothing, 1 the stem, k >= 2 the
    stem and res2..res{k}. `resnet_kwargs` are backbones.ResNet's options (block given by name).
    """

    def __init__(self, *, out_features: Sequence[str] = STAGE_NAMES, freeze_at: int = 0, **resnet_kwargs):
        block = resnet_kwargs.pop("block", "bottleneck")
        super().__init__(block=CNN_BLOCKS[block], num_classes=0, **resnet_kwargs)
        self.resnet_options = {"block": block, **resnet_kwargs}  # what an ImageNet twin of this model needs
        unknown = [f for f in out_features if f not in STAGE_NAMES]
        if unknown or not out_features:
            raise ValueError(f"out_features {list(out_features)} must be among {list(STAGE_NAMES)}")
        num_stages = max(STAGE_NAMES.index(f) for f in out_features) + 1
        for i in range(num_stages, len(STAGE_NAMES)):
            delattr(self, f"layer{i + 1}")
        self.feature_info = self.feature_info[:num_stages]
        self._out_features = [f for f in STAGE_NAMES if f in out_features]
        self._out_feature_channels = {f["name"]: f["channels"] for f in self.feature_info}
        self._out_feature_strides = {f["name"]: f["stride"] for f in self.feature_info}
        self.freeze(freeze_at)

    def stages(self) -> list[tuple[str, torch.nn.Sequential]]:
        """[(feature name, stage)] of the stages this backbone keeps, res2 first."""
        return [(info["name"], getattr(self, f"layer{i + 1}")) for i, info in enumerate(self.feature_info)]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(N, C, H, W) -> {"res2": (N, C2, H/4, W/4), ...} for the names in `out_features`."""
        x = self.stem(x)
        features = {}
        for name, stage in self.stages():
            x = stage(x)
            if name in self._out_features:
                features[name] = x
        return features

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }

    def freeze(self, freeze_at: int = 0) -> SEResNet:
        """Freeze the stem (freeze_at >= 1) and res2..res{freeze_at}: no gradients, BN -> FrozenBN."""
        if freeze_at >= 1:
            for name in STEM_MODULES:
                module = getattr(self, name, None)
                if module is not None:
                    module.requires_grad_(False)
                    setattr(self, name, FrozenBatchNorm2d.convert_frozen_batchnorm(module))
        for index, (_, stage) in enumerate(self.stages(), start=2):
            if freeze_at >= index:
                for block in stage:
                    block.freeze()
        return self


def resnet_options(cfg: CfgNode, in_channels: int = 3) -> dict:
    """backbones.ResNet options from MODEL.RESNETS (depth, groups, width, norm, stride) and MODEL.SENET."""
    res, se = cfg.MODEL.RESNETS, cfg.MODEL.SENET
    try:
        base = model_options(f"resnet{res.DEPTH}")  # the registry's stage depths and block type for this depth
    except ValueError:
        raise ValueError(f"MODEL.RESNETS.DEPTH={res.DEPTH} is not one of 18, 34, 50, 101, 152") from None
    res2_channels = 64 * CNN_BLOCKS[base["block"]].expansion
    if res2_channels != res.RES2_OUT_CHANNELS:
        raise ValueError(
            f"MODEL.RESNETS.RES2_OUT_CHANNELS={res.RES2_OUT_CHANNELS} does not fit depth {res.DEPTH}: "
            f"set it to {res2_channels}"
        )
    if res.NORM not in NORMS:
        raise ValueError(f"MODEL.RESNETS.NORM={res.NORM!r}: the SE-ResNet backbone takes one of {', '.join(NORMS)}")
    if res.RES5_DILATION != 1 or any(res.DEFORM_ON_PER_STAGE):
        raise ValueError("the SE-ResNet backbone has no dilated res5 or deformable convs (RES5_DILATION 1, DEFORM off)")
    return {
        "block": base["block"],
        "layers": tuple(base["layers"]),
        "groups": res.NUM_GROUPS,
        "width_per_group": res.WIDTH_PER_GROUP,
        "stride_in_1x1": res.STRIDE_IN_1X1,
        "stem_width": res.STEM_OUT_CHANNELS,
        "stem_pool_ceil": se.STEM_POOL_CEIL,
        "se": se.ENABLED,
        "se_reduction": se.REDUCTION,
        "se_divisor": se.DIVISOR,
        "se_squeeze": se.SQUEEZE,
        "se_gate": se.GATE,
        "se_bias": se.BIAS,
        "se_placement": se.PLACEMENT,
        "se_stages": tuple(se.STAGES),
        "norm_layer": partial(get_norm, res.NORM),
        "in_chans": in_channels,
    }


@BACKBONE_REGISTRY.register()
def build_se_resnet_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> SEResNet:
    """(SE-)ResNet with MODEL.RESNETS.OUT_FEATURES, e.g. ["res4"] for C4 Faster R-CNN."""
    return SEResNet(
        out_features=cfg.MODEL.RESNETS.OUT_FEATURES,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        **resnet_options(cfg, input_shape.channels),
    )


@BACKBONE_REGISTRY.register()
def build_se_resnet_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    """(SE-)ResNet + FPN (P2..P5 and P6 by LastLevelMaxPool), as detectron2's R-CNN FPN backbone."""
    return FPN(
        bottom_up=build_se_resnet_backbone(cfg, input_shape),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
