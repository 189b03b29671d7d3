# Smoke run: the SE-ResNet-50 Faster R-CNN of Table 7 trained from scratch on the synthetic shapes dataset
# (detection/synthetic.py, generated on first use) on CPU in minutes, evaluated with COCO AP (pycocotools).
#
#   python tools/train_mmdet.py configs/mmdet/smoke/faster-rcnn_se-r50_fpn_synthetic.py
#
# Same detector code and backbone class as the COCO configs; only the data, the image size, the schedule, the
# width of FPN and heads and the RPN / RoI sample sizes change, and BN trains (no ImageNet statistics to keep).
_base_ = "../faster-rcnn_se-r50_fpn_2x_coco.py"

# tools/train_mmdet.py calls detection.synthetic.make_synthetic_coco(**synthetic_data) before building the run
# (a no-op when the files are complete). Root and options equal the Detectron2 smoke run's
# ($DETECTRON2_DATASETS/synthetic_coco, detection.synthetic.SMOKE_OPTIONS: 400 train / 60 val of 128 x 128), so both
# engines train on the very same files. Class names must equal detection.synthetic.SYNTHETIC_CLASSES.
data_root = "{{$DETECTRON2_DATASETS:datasets}}/synthetic_coco/"
synthetic_data = dict(root=data_root, num_train=400, num_val=60, image_size=128, seed=0)
metainfo = dict(classes=("red_rectangle", "green_ellipse", "blue_triangle", "yellow_diamond"))
image_scale = (128, 128)

model = dict(
    # From scratch (no weights can be downloaded here); `--cfg-options model.backbone.init_cfg.checkpoint=PATH`
    # starts from ImageNet weights instead.
    backbone=dict(frozen_stages=-1, norm_eval=False, init_cfg=dict(checkpoint=None)),
    # FPN and heads at a quarter of the COCO width (64 channels, 256-d box FCs): on CPU they would otherwise
    # cost as much as the SE-ResNet-50 itself.
    neck=dict(out_channels=64),
    rpn_head=dict(
        in_channels=64,
        feat_channels=64,
        anchor_generator=dict(scales=[4]),  # objects are 15..51 px: anchors of 16..256 px on P2..P6
    ),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=64),
        bbox_head=dict(in_channels=64, fc_out_channels=256, num_classes=len(metainfo["classes"])),
    ),
    train_cfg=dict(
        rpn=dict(sampler=dict(num=128)),
        rpn_proposal=dict(nms_pre=500, max_per_img=200),
        rcnn=dict(sampler=dict(num=128)),
    ),
    test_cfg=dict(rpn=dict(nms_pre=500, max_per_img=200)),
)

train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", with_bbox=True),
    dict(type="Resize", scale=image_scale, keep_ratio=True),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackDetInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=image_scale, keep_ratio=True),
    dict(type="LoadAnnotations", with_bbox=True),
    dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
]
train_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file="annotations/instances_synthetic_train.json",
        data_prefix=dict(img="train/"),
        filter_cfg=dict(filter_empty_gt=True, min_size=0),
        pipeline=train_pipeline,
    ),
)
val_dataloader = dict(
    batch_size=2,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file="annotations/instances_synthetic_val.json",
        data_prefix=dict(img="val/"),
        pipeline=test_pipeline,
    ),
)
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + "annotations/instances_synthetic_val.json")
test_evaluator = val_evaluator

max_iters = 300
train_cfg = dict(_delete_=True, type="IterBasedTrainLoop", max_iters=max_iters, val_interval=max_iters)
param_scheduler = [
    dict(type="LinearLR", start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type="MultiStepLR", by_epoch=False, begin=0, end=max_iters, milestones=[220, 280], gamma=0.1),
]
optim_wrapper = dict(optimizer=dict(lr=0.02), clip_grad=dict(max_norm=10.0))
auto_scale_lr = dict(enable=False, base_batch_size=4)

default_hooks = dict(
    logger=dict(interval=20),
    checkpoint=dict(by_epoch=False, interval=max_iters),
    visualization=dict(draw=False),
)
log_processor = dict(by_epoch=False)
env_cfg = dict(dist_cfg=dict(backend="gloo"))
randomness = dict(seed=0)  # repeatable smoke runs (model init, sampling, data order)
