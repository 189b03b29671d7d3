"""`add_senet_config(cfg)`: the config this add-on adds, MODEL.SENET and MODEL.ALLOW_PARTIAL_WEIGHTS.

Everything a plain ResNet has is read from detectron2's own keys: MODEL.RESNETS.DEPTH, NUM_GROUPS,
WIDTH_PER_GROUP, NORM, STRIDE_IN_1X1, STEM_OUT_CHANNELS, RES2_OUT_CHANNELS, OUT_FEATURES and
MODEL.BACKBONE.FREEZE_AT. MODEL.SENET only says whether and how the SE blocks are plugged in, so the SE and plain
rows of Table 7 are the same config with MODEL.SENET.ENABLED true or false.
"""

from __future__ import annotations

from detectron2.config import CfgNode as CN

from backbones import SEOptions


def add_senet_config(cfg: CN) -> CN:
    """Add MODEL.SENET to a detectron2 config, in place; returns it.

    One key per `backbones.SEOptions` field, its name in capitals, with that field's default (the paper's SE
    block), plus ENABLED and STEM_POOL_CEIL; `detection.detectron2.backbone.se_options` reads them back.
    """
    se = SEOptions()
    _C = cfg
    _C.MODEL.SENET = CN()
    # SE blocks on; false builds the plain ResNet through the very same builder (the baseline rows).
    _C.MODEL.SENET.ENABLED = True
    # r: the excitation squeezes C channels to C / r (Table 10; 16 in the paper and its released models).
    _C.MODEL.SENET.REDUCTION = se.reduction
    # Squeeze: "avg" global pooling (the paper), "max" (Table 11) or "none" (Table 16, NoSqueeze).
    _C.MODEL.SENET.SQUEEZE = se.squeeze
    # Excitation gate: "sigmoid" (the paper), "tanh" or "relu" (Table 12).
    _C.MODEL.SENET.GATE = se.gate
    # Biases on the two excitation FCs: the released models have them, the paper's ablations drop them.
    _C.MODEL.SENET.BIAS = se.bias
    # Round C / r to a multiple of this (timm and mmpretrain weights use 8; the paper 1).
    _C.MODEL.SENET.DIVISOR = se.divisor
    # Where SE sits: "standard" (residual branch, before the sum), "pre", "post", "identity" (Table 14) or
    # "3x3" (after the 3x3 conv inside the branch, Table 15).
    _C.MODEL.SENET.PLACEMENT = se.placement
    # Stages with SE blocks, among 2..5 = res2..res5 (Table 13).
    _C.MODEL.SENET.STAGES = list(se.stages)
    # Stem max-pool without padding and in ceil mode, as the Caffe-style official weights (Cadene / timm
    # legacy_se*); they also need MODEL.RESNETS.STRIDE_IN_1X1 true. torchvision / timm weights: false.
    _C.MODEL.SENET.STEM_POOL_CEIL = False
    # A detector checkpoint in MODEL.WEIGHTS must fit the whole model (every tensor, right shape) or nothing is
    # loaded; true lets tensors outside the backbone be missing or of other shapes (fine-tuning a detector with
    # other heads), which then keep their initialisation. The backbone must fit either way.
    _C.MODEL.ALLOW_PARTIAL_WEIGHTS = False
    return cfg
