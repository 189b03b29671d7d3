# Table 7, ResNet-50 row: the SE-ResNet-50 config with SE switched off and plain ImageNet weights; same backbone
# class, same detector, same schedule and data.
_base_ = "./faster-rcnn_se-r50_fpn_2x_coco.py"

model = dict(
    backbone=dict(
        se=None,
        init_cfg=dict(type="Pretrained", checkpoint="pretrained/resnet50.pth"),
    )
)
