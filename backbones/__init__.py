"""SE-ResNet, SE-ResNeXt, SENet-154 and the paper's CIFAR networks, in plain PyTorch."""

from .checkpoint_files import CheckpointError, UntrustedCheckpointError, read_checkpoint
from .cifar import CifarResNet
from .export import convert_checkpoint, save_checkpoint, save_detectron2, to_detectron2
from .loader import LoadReport, create_pretrained, load_pretrained
from .registry import create_model, list_models, model_config, model_options
from .resnet import BasicBlock, Bottleneck, ResNet
from .se import SqueezeExcite

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "CheckpointError",
    "CifarResNet",
    "LoadReport",
    "ResNet",
    "SqueezeExcite",
    "UntrustedCheckpointError",
    "convert_checkpoint",
    "create_model",
    "create_pretrained",
    "list_models",
    "load_pretrained",
    "model_config",
    "model_options",
    "read_checkpoint",
    "save_checkpoint",
    "save_detectron2",
    "to_detectron2",
]
