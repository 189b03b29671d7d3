"""The Places365 and ImageNet trainers: the shared classification CLI with this package's DataModules.

    python tools/train_places365.py fit --config configs/places365_se_resnet152.yaml --data.root DIR
    python tools/train_imagenet.py fit --config configs/imagenet_se_resnet50.yaml --data.root DIR

Every option of the DataModule, the model and the trainer is a `--data.*`, `--model.*`, `--trainer.*` flag.
"""

from __future__ import annotations

from typing import Any

import torch

from classification.cli import ClassificationCLI
from classification.module import ClassificationModule

from .datamodule import Places365DataModule
from .imagenet import ImageNetDataModule


class MultiCropClassificationModule(ClassificationModule):
    """ClassificationModule that also takes several crops per image (ten-crop evaluation).

    (N, 3, H, W) -> logits (N, C) as before; (N, K, 3, H, W) -> log of the K crops' mean softmax (N, C).
    Those log-probabilities are valid logits: their softmax is the mean softmax, their cross-entropy is
    -log(mean p_y), and the top-k ranking is the mean softmax's.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            return super().forward(x)
        n, k = x.shape[:2]
        probs = super().forward(x.flatten(0, 1)).float().softmax(1).view(n, k, -1).mean(1)
        return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


def places365_cli(args: list[str] | dict[str, Any] | None = None, *, run: bool = True, **kwargs) -> ClassificationCLI:
    """The Places365 trainer (`fit | validate | test --config ...`); `args` default to sys.argv[1:]."""
    return _cli(Places365DataModule, args, run, kwargs)


def imagenet_cli(args: list[str] | dict[str, Any] | None = None, *, run: bool = True, **kwargs) -> ClassificationCLI:
    """The ImageNet trainer; its checkpoints load into every downstream task via `backbones.load_pretrained`."""
    return _cli(ImageNetDataModule, args, run, kwargs)


def _cli(datamodule_class, args, run: bool, kwargs: dict) -> ClassificationCLI:
    return ClassificationCLI(
        MultiCropClassificationModule,
        datamodule_class,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        **kwargs,
    )
