"""Detectron2 add-on: Faster R-CNN with SE-ResNet backbones (Table 7), plus a synthetic COCO-format dataset.

Importing the package registers, when detectron2 is installed, the backbones `build_se_resnet_backbone` and
`build_se_resnet_fpn_backbone`, the C4 head `SERes5ROIHeads` and the datasets `senet_synthetic_train` /
`senet_synthetic_val`. Without detectron2 the package still imports and offers its detectron2-free part, the
synthetic dataset generator; `HAS_DETECTRON2` says which.
"""

from importlib.util import find_spec

from .synthetic import SYNTHETIC_CLASSES, make_synthetic_coco

HAS_DETECTRON2 = find_spec("detectron2") is not None

__all__ = ["HAS_DETECTRON2", "SYNTHETIC_CLASSES", "make_synthetic_coco"]

if HAS_DETECTRON2:
    from .backbone import SEResNet, build_se_resnet_backbone, build_se_resnet_fpn_backbone
    from .checkpoint import SENetCheckpointer
    from .config import add_senet_config
    from .data import register_synthetic_datasets
    from .engine import Trainer, build_model_from_config, get_config
    from .roi_heads import SERes5ROIHeads

    register_synthetic_datasets()
    __all__ += [
        "SENetCheckpointer",
        "SERes5ROIHeads",
        "SEResNet",
        "Trainer",
        "add_senet_config",
        "build_model_from_config",
        "build_se_resnet_backbone",
        "build_se_resnet_fpn_backbone",
        "get_config",
    ]
