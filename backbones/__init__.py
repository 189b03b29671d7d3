"""SE-ResNet, SE-ResNeXt, SENet-154 and the paper's CIFAR networks, in plain PyTorch."""

from .cifar import CifarResNet
from .registry import create_model, list_models, model_config, model_options
from .resnet import BasicBlock, Bottleneck, ResNet
from .se import SqueezeExcite

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "ResNet",
    "SqueezeExcite",
    "create_model",
    "list_models",
    "model_config",
    "model_options",
]
