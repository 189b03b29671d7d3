"""Detectron2 add-on: importing this package registers `build_se_resnet_backbone`, `build_se_resnet_fpn_backbone`
and the synthetic datasets `senet_synthetic_train` / `senet_synthetic_val` (as detectron2's projects do).
`tools` runs detectron2's own tools on our configs (tools/d2_tool.py); `analysis` counts the SE ops' FLOPs."""

from .backbone import SEResNet, build_se_resnet_backbone, build_se_resnet_fpn_backbone
from .checkpoint import SENetCheckpointer
from .config import add_senet_config
from .data import register_synthetic_datasets
from .engine import Trainer, build_model_from_config, get_config

register_synthetic_datasets()

__all__ = [
    "SENetCheckpointer",
    "SEResNet",
    "Trainer",
    "add_senet_config",
    "build_model_from_config",
    "build_se_resnet_backbone",
    "build_se_resnet_fpn_backbone",
    "get_config",
]
