"""The networks: the SE block and its options, ImageNet ResNet / ResNeXt / SENet-154, the CIFAR networks, and the
registry of names. Plain PyTorch; nothing here reads a file."""

from .cifar import CifarResNet
from .options import SEOptions
from .registry import ModelConfig, build_model, list_models, model_config, model_options
from .resnet import BasicBlock, Bottleneck, ResNet
from .se import SqueezeExcite

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "ModelConfig",
    "ResNet",
    "SEOptions",
    "SqueezeExcite",
    "build_model",
    "list_models",
    "model_config",
    "model_options",
]
