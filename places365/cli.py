"""The Places365 and ImageNet trainers: the shared classification CLI with this package's DataModules.

    python tools/train_places365.py fit --config configs/places365_se_resnet152.yaml --data.root DIR
    python tools/train_imagenet.py fit --config configs/imagenet_se_resnet50.yaml --data.root DIR

Every option of the DataModule, the model and the trainer is a `--data.*`, `--model.*`, `--trainer.*` flag.
"""

from __future__ import annotations

from typing import Any

from classification.cli import ClassificationCLI, run_cli

from .datamodule import Places365DataModule
from .imagenet import ImageNetDataModule


def places365_cli(args: list[str] | dict[str, Any] | None = None, *, run: bool = True, **kwargs) -> ClassificationCLI:
    """The Places365 trainer (`fit | validate | test --config ...`); `args` default to sys.argv[1:]."""
    return run_cli(Places365DataModule, args, run=run, **kwargs)


def imagenet_cli(args: list[str] | dict[str, Any] | None = None, *, run: bool = True, **kwargs) -> ClassificationCLI:
    """The ImageNet trainer; its checkpoints load into every downstream task via `backbones.load_pretrained`."""
    return run_cli(ImageNetDataModule, args, run=run, **kwargs)
