# Table 7, SE-ResNet-50 row: Faster R-CNN + FPN, 2x schedule, COCO 2017 train, evaluated on val2017 (= minival).
#
# Everything except the backbone and the data location is MMDetection's own config, inherited from the installed
# package (mmdet/.mim/configs): 24 epochs (~ Detectron's 180k iterations at 16 images), SGD lr 0.02, momentum 0.9,
# weight decay 1e-4, lr x0.1 at epochs 16 and 22, 500-iteration linear warm-up, train/test scale (1333, 800),
# RGB input normalised with the ImageNet mean/std of torchvision/timm weights.
#
# Batch: 2 images per GPU (mmdet's default) x 8 GPUs = 16 images per iteration, the paper's 2x setting. On another
# number of GPUs pass `--auto-scale-lr` to tools/train_mmdet.py: it scales lr 0.02 linearly by
# (GPUs x 2) / 16 (auto_scale_lr.base_batch_size = 16 below), e.g. 4 GPUs -> 0.01.
_base_ = "mmdet::faster_rcnn/faster-rcnn_r50_fpn_2x_coco.py"

# Importing the module registers type="SEResNet" in mmdet's MODELS registry and lets torch's weights-only loading
# read MMEngine's checkpoints, so mmdet's own tools/test.py, DetInferencer and init_detector take this config as is.
custom_imports = dict(imports=["detection.mmdet.backbone"], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,  # every argument of the backbone is set here (mmdet's base names torchvision weights)
        type="SEResNet",  # mmdet's ResNet arguments and state-dict layout, plus the SE blocks
        depth=50,
        # The SE blocks, as backbones.SEOptions fields (reduction, squeeze, gate, bias, divisor, placement,
        # stages); unnamed fields keep the paper's values. None builds the plain ResNet.
        se=dict(reduction=16),
        style="pytorch",  # as mmdet's: stride in the 3x3 conv ("caffe": in the first 1x1)
        with_cp=False,  # True: gradient checkpointing per block, for deeper SE-ResNets on small GPUs
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,  # stem + res2 frozen, as mmdet's and Detectron's R50-FPN
        norm_cfg=dict(type="BN", requires_grad=True),
        norm_eval=True,  # ImageNet BN statistics kept: 2 images per GPU are too few to re-estimate them
        # Any format backbones.load_pretrained reads (our checkpoints, timm, torchvision, Cadene, mmpretrain, mmdet
        # detectors with prefix="backbone.") or mmengine's zoo names (torchvision://resnet50) from torch's hub cache.
        init_cfg=dict(type="Pretrained", checkpoint="pretrained/se_resnet50.pth"),
    )
)

# COCO where Detectron2 looks for it, so both engines share one copy:
#   $DETECTRON2_DATASETS (default ./datasets)/coco/{train2017,val2017}/ and
#   .../coco/annotations/instances_{train,val}2017.json
data_root = "{{$DETECTRON2_DATASETS:datasets}}/coco/"
train_dataloader = dict(batch_size=2, dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + "annotations/instances_val2017.json")
test_evaluator = val_evaluator

auto_scale_lr = dict(enable=False, base_batch_size=16)
