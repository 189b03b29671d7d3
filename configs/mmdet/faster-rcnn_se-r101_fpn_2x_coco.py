# Table 7, SE-ResNet-101 row: the SE-ResNet-50 config at depth 101.
_base_ = "./faster-rcnn_se-r50_fpn_2x_coco.py"

model = dict(
    backbone=dict(
        depth=101,
        init_cfg=dict(type="Pretrained", checkpoint="pretrained/se_resnet101.pth"),
    )
)
