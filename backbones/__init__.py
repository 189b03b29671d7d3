"""SE-ResNet, SE-ResNeXt, SENet-154 and the paper's CIFAR networks in plain PyTorch, and the checkpoint loader
that imports any well-known ImageNet weights into them.

- `models`: the SE block and its options (`SEOptions`), the networks, the registry of names;
- `checkpoints`: reading, loading and writing weights (knows no model names);
- `factory`: `create_model(name, pretrained=...)`, `create_pretrained`, `convert_checkpoint` (above both);
- `fileio`: all-or-nothing writes and the numpy-only unpickler; `complexity`, `ablations`: the paper's tables.
"""

from .checkpoints import (
    CheckpointError,
    LoadReport,
    OptionMismatchError,
    UntrustedCheckpointError,
    load_pretrained,
    read_checkpoint,
    save_checkpoint,
    save_detectron2,
    to_detectron2,
)
from .factory import convert_checkpoint, create_model, create_pretrained
from .models import (
    BasicBlock,
    Bottleneck,
    CifarResNet,
    ResNet,
    SEOptions,
    SqueezeExcite,
    build_model,
    list_models,
    model_config,
    model_options,
)

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "CheckpointError",
    "CifarResNet",
    "LoadReport",
    "OptionMismatchError",
    "ResNet",
    "SEOptions",
    "SqueezeExcite",
    "UntrustedCheckpointError",
    "build_model",
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
