# Table 7, ResNet-101 row: the ResNet-50 config (SE off) at depth 101.
_base_ = "./faster-rcnn_r50_fpn_2x_coco.py"

model = dict(
    backbone=dict(
        depth=101,
        init_cfg=dict(type="Pretrained", checkpoint="pretrained/resnet101.pth"),
    )
)
