"""Our (SE-)ResNet as a detectron2 backbone, alone and with FPN.

`SEResNet` is a detectron2 `Backbone` holding the one ResNet trunk of `backbones` by composition:
`build_trunk(self, ...)` gives it the stem and the stages up to the last of `out_features`, under our names
(`conv1`, `layer1.0.se.fc1`, ...). In the FPN model it is `backbone.bottom_up`, so an ImageNet state dict of
ours maps onto it by prefixing `backbone.bottom_up.` (`backbones.to_detectron2`). Norms come from detectron2's
`get_norm` (MODEL.RESNETS.NORM), freezing is detectron2's (requires_grad off, BN -> `FrozenBatchNorm2d`), and
the SE options are one `SEOptions` read from MODEL.SENET.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from detectron2.config import CfgNode
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool

from backbones import SEOptions
from backbones.models.resnet import BLOCKS, STAGE_NAMES, build_trunk, init_trunk

from ..trunk import depth_geometry, forward_trunk, trunk_parts

NORMS = ("FrozenBN", "BN", "SyncBN", "GN")  # what detectron2's get_norm builds for a conv backbone


class SEResNet(Backbone):
    """(SE-)ResNet trunk as a detectron2 Backbone: (N, C, H, W) -> {name: (N, C_s, H/s, W/s)} for `out_features`.

    Only the stages up to the last requested feature are built. `freeze_at` follows detectron2: 0 nothing,
    1 the stem, k >= 2 the stem and res2..res{k}. `norm` is a detectron2 norm name (`get_norm`); `options` are
    `build_trunk`'s (block, layers, groups, width_per_group, se: SEOptions or None, stride_in_1x1, ...).
    """

    def __init__(self, *, out_features: Sequence[str] = STAGE_NAMES, freeze_at: int = 0, norm: str = "BN", **options):
        super().__init__()
        unknown = [f for f in out_features if f not in STAGE_NAMES]
        if unknown or not out_features:
            raise ValueError(f"out_features {list(out_features)} must be among {list(STAGE_NAMES)}")
        if norm not in NORMS:
            raise ValueError(f"MODEL.RESNETS.NORM={norm!r}: the SE-ResNet backbone takes one of {', '.join(NORMS)}")
        num_stages = max(STAGE_NAMES.index(f) for f in out_features) + 1
        self.feature_info = build_trunk(self, num_stages=num_stages, norm_layer=partial(get_norm, norm), **options)
        init_trunk(self)
        self._out_features = [f for f in STAGE_NAMES if f in out_features]
        self._out_feature_channels = {f["name"]: f["channels"] for f in self.feature_info}
        self._out_feature_strides = {f["name"]: f["stride"] for f in self.feature_info}
        self.freeze(freeze_at)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(N, C, H, W) -> {"res2": (N, C2, H/4, W/4), ...} for the names in `out_features`."""
        return forward_trunk(self, x, self._out_features)

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }

    def freeze(self, freeze_at: int = 0) -> SEResNet:
        """Freeze the stem (freeze_at >= 1) and res2..res{freeze_at}: no gradients, BN -> FrozenBN."""
        for names in trunk_parts(self)[:freeze_at]:
            for name in names:
                module = getattr(self, name).requires_grad_(False)
                setattr(self, name, FrozenBatchNorm2d.convert_frozen_batchnorm(module))
        return self


def se_options(cfg: CfgNode) -> SEOptions | None:
    """MODEL.SENET as `SEOptions` (each field from the key of its name in capitals), None when not ENABLED."""
    se = cfg.MODEL.SENET
    return SEOptions(**{name: se[name.upper()] for name in SEOptions.names()}) if se.ENABLED else None


def resnet_options(cfg: CfgNode) -> dict:
    """`build_trunk` options from MODEL.RESNETS (depth, groups, width, stride, stem) and MODEL.SENET."""
    res = cfg.MODEL.RESNETS
    geometry = depth_geometry(res.DEPTH, "MODEL.RESNETS.DEPTH")
    res2_channels = 64 * BLOCKS[geometry["block"]].expansion
    if res2_channels != res.RES2_OUT_CHANNELS:
        raise ValueError(
            f"MODEL.RESNETS.RES2_OUT_CHANNELS={res.RES2_OUT_CHANNELS} does not fit depth {res.DEPTH}: "
            f"set it to {res2_channels}"
        )
    if res.RES5_DILATION != 1 or any(res.DEFORM_ON_PER_STAGE):
        raise ValueError("the SE-ResNet backbone has no dilated res5 or deformable convs (RES5_DILATION 1, DEFORM off)")
    return {
        **geometry,
        "groups": res.NUM_GROUPS,
        "width_per_group": res.WIDTH_PER_GROUP,
        "stride_in_1x1": res.STRIDE_IN_1X1,
        "stem_width": res.STEM_OUT_CHANNELS,
        "stem_pool_ceil": cfg.MODEL.SENET.STEM_POOL_CEIL,
        "se": se_options(cfg),
    }


@BACKBONE_REGISTRY.register()
def build_se_resnet_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> SEResNet:
    """(SE-)ResNet with the features MODEL.RESNETS.OUT_FEATURES names."""
    return SEResNet(
        out_features=cfg.MODEL.RESNETS.OUT_FEATURES,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        norm=cfg.MODEL.RESNETS.NORM,
        in_chans=input_shape.channels,
        **resnet_options(cfg),
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
