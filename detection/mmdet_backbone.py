"""Our SE-ResNet / ResNet / ResNeXt as an MMDetection backbone: `type="SEResNet"` in `mmdet.registry.MODELS`.

Importing this module registers the backbone; MMDetection configs do it with
`custom_imports = dict(imports=["detection.mmdet_backbone"], allow_failed_imports=False)`.

The network is `backbones.ResNet` itself (held as `self.body`, torchvision/timm parameter names beneath it);
this wrapper only speaks MMDetection's backbone dialect: `depth`, `out_indices`, `frozen_stages`, `norm_cfg`,
`norm_eval`, `style`, and `init_cfg=dict(type="Pretrained", checkpoint=PATH)` read through our common loader
(`backbones.loader.load_pretrained`, every checkpoint format it knows). The plain baselines are this same class
with `se=False`, so the SE and plain detectors share one code path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from mmcv.cnn import build_norm_layer
from mmdet.registry import MODELS
from mmengine.model import BaseModule
from mmengine.model.weight_init import initialize
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from backbones import model_config
from backbones.loader import load_pretrained
from backbones.resnet import STAGE_NAMES, STAGES

DEPTHS = (18, 34, 50, 101, 152)


@MODELS.register_module()
class SEResNet(BaseModule):
    """MMDetection backbone over `backbones.ResNet`: (N, 3, H, W) -> tuple of stage features.

    Output i is stage `out_indices[i]` (0..3 = res2..res5): (N, C_s, H/s, W/s) with strides 4, 8, 16, 32 and
    channels 256, 512, 1024, 2048 for bottleneck depths (64..512 for depths 18/34), as mmdet's `ResNet`.

    Args:
        depth: 18, 34, 50, 101 or 152; picks the block counts of `backbones`' `resnet{depth}`.
        groups, base_width: ResNeXt's cardinality and width per group (32, 4 for 32x4d).
        stage_blocks: override the four stage depths (tests build tiny networks with (1, 1, 1, 1)).
        out_indices: which stages to return, 0..3.
        frozen_stages: -1 freezes nothing; 0 the stem; k the stem and stages 1..k (requires_grad False, eval).
        norm_cfg: mmcv norm config (BN, SyncBN, GN, ...), built with `mmcv.cnn.build_norm_layer`.
        norm_eval: keep every BatchNorm in eval mode while training (frozen running statistics).
        style: "pytorch" (stride in the 3x3 conv) or "caffe" (stride in the first 1x1, ceil-mode stem pool,
            the layout of the official Caffe SENet weights).
        se, se_*: the SE options of `backbones.ResNet` (reduction, squeeze, gate, bias, placement, stages).
        zero_init_residual: zero the last norm of each block when no pretrained weights are loaded.
        init_cfg: `dict(type="Pretrained", checkpoint=PATH, **loader_options)` loads PATH through
            `backbones.loader.load_pretrained` (any format it reads; options such as prefix, format, ema,
            trusted pass through); checkpoint None or "" trains from scratch; other mmengine initialisers
            are applied as mmengine does.
    """

    def __init__(
        self,
        depth: int = 50,
        *,
        in_channels: int = 3,
        groups: int = 1,
        base_width: int = 64,
        stage_blocks: Sequence[int] | None = None,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        frozen_stages: int = -1,
        norm_cfg: dict | None = None,
        norm_eval: bool = True,
        style: str = "pytorch",
        se: bool = True,
        se_reduction: float = 16,
        se_squeeze: str = "avg",
        se_gate: str = "sigmoid",
        se_bias: bool = True,
        se_divisor: int = 1,
        se_placement: str = "standard",
        se_stages: Sequence[int] = STAGES,
        zero_init_residual: bool = True,
        init_cfg: dict | list[dict] | None = None,
    ):
        super().__init__(init_cfg)
        if depth not in DEPTHS:
            raise ValueError(f"SEResNet depth={depth} is not one of {DEPTHS}")
        bad = [i for i in out_indices if i not in range(len(STAGES))]
        if bad or not out_indices:
            raise ValueError(f"out_indices {tuple(out_indices)} must be a non-empty subset of 0..3 (res2..res5)")
        if not -1 <= frozen_stages <= len(STAGES):
            raise ValueError(f"frozen_stages={frozen_stages} must be in -1..{len(STAGES)}")
        norm_cfg = dict(type="BN", requires_grad=True) if norm_cfg is None else dict(norm_cfg)
        overrides = {} if stage_blocks is None else {"layers": tuple(stage_blocks)}
        cls, kwargs = model_config(
            f"resnet{depth}",
            in_chans=in_channels,
            groups=groups,
            width_per_group=base_width,
            num_classes=0,
            style=style,
            se=se,
            se_reduction=se_reduction,
            se_squeeze=se_squeeze,
            se_gate=se_gate,
            se_bias=se_bias,
            se_divisor=se_divisor,
            se_placement=se_placement,
            se_stages=tuple(se_stages),
            zero_init_last=zero_init_residual,
            norm_layer=lambda channels: build_norm_layer(norm_cfg, channels)[1],
            **overrides,
        )
        self.body = cls(**kwargs)
        self.depth = depth
        self.out_indices = tuple(out_indices)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        info = self.body.feature_info
        self.out_channels = tuple(info[i]["channels"] for i in self.out_indices)
        self.strides = tuple(info[i]["stride"] for i in self.out_indices)
        self._freeze_stages()

    def _stages(self) -> list[nn.Module]:
        """[stem, layer1, ..., layer4]; the stem is every conv/norm before the first stage (3 of each for deep_stem)."""
        stem = nn.ModuleList(m for name, m in self.body.named_children() if name.startswith(("conv", "bn")))
        return [stem, self.body.layer1, self.body.layer2, self.body.layer3, self.body.layer4]

    def _freeze_stages(self) -> None:
        for module in self._stages()[: self.frozen_stages + 1]:
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True) -> SEResNet:
        """Train mode, except frozen stages (always eval) and, with `norm_eval`, every BatchNorm."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    def init_weights(self) -> None:
        """Load `init_cfg`'s Pretrained checkpoint through our loader; without one keep the He init of
        construction (mmengine would otherwise re-run `ResNet.init_weights` and undo zero_init_residual)."""
        cfgs = [] if not self.init_cfg else self.init_cfg if isinstance(self.init_cfg, list) else [self.init_cfg]
        pretrained = [c for c in cfgs if c.get("type") == "Pretrained"]
        others = [c for c in cfgs if c.get("type") != "Pretrained"]
        if others:
            initialize(self, others)
        for cfg in pretrained:
            if not cfg.get("checkpoint"):
                continue  # checkpoint None / "": from scratch, like detectron2's MODEL.WEIGHTS ""
            # Extra keys (prefix, map_location, format, ema, trusted, strict) go to the loader as they are.
            options = {k: v for k, v in cfg.items() if k not in ("type", "checkpoint")}
            load_pretrained(self.body, cfg["checkpoint"], **options)
        self._is_init = True

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(N, 3, H, W) -> tuple of (N, C_s, H/s, W/s), one per entry of `out_indices`."""
        features = self.body.forward_features(x)
        return tuple(features[STAGE_NAMES[i]] for i in self.out_indices)
