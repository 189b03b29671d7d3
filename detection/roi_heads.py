"""C4 Faster R-CNN box head whose res5 is our (SE-)ResNet's stage 5, not detectron2's plain one."""

from __future__ import annotations

from detectron2.config import CfgNode
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.roi_heads import Res5ROIHeads
from torch import nn

from backbones import ResNet

from .backbone import CNN_BLOCKS, resnet_options


@ROI_HEADS_REGISTRY.register()
class SERes5ROIHeads(Res5ROIHeads):
    """Res5ROIHeads with res5 = `layer4` of the ResNet that MODEL.RESNETS / MODEL.SENET describe.

    Its parameters are `roi_heads.res5.<block>...` with our block names, so an ImageNet checkpoint's `layer4.*`
    maps onto them (`detection.checkpoint`).
    """

    @classmethod
    def _build_res5_block(cls, cfg: CfgNode) -> tuple[nn.Sequential, int]:
        options = resnet_options(cfg)
        options["block"] = CNN_BLOCKS[options["block"]]
        # Built through the one ResNet constructor (a whole network, of which only stage 5 is kept) rather
        # than a second copy of its stage logic.
        res5 = ResNet(num_classes=0, **options).layer4
        return res5, res5[-1].out_channels
