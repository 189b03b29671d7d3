"""Faster R-CNN with SE-ResNet backbones (Table 7) on two engines, one backbone:

- `detection.detectron2`: the Detectron2 add-on (backbone builders, MODEL.SENET config, checkpointer, trainer);
- `detection.mmdet`: the MMDetection backbone `type="SEResNet"` and the runner behind tools/train_mmdet.py;
- `detection.trunk`: what the two backbone adapters share: each holds the one ResNet trunk of `backbones`
  (`build_trunk(self, ...)`, parameters conv1, layer1.0.se.fc1, ... directly under it), loads ImageNet
  checkpoints through the common loader and names its own config keys for the options weights need;
- `detection.synthetic`: the small COCO-format dataset both engines' smoke configs train on.

Importing `detection` registers the Detectron2 parts when detectron2 is installed (`HAS_DETECTRON2`), as a
detectron2 project package does; the synthetic dataset generator needs neither engine.
"""

from importlib.util import find_spec

from .synthetic import SYNTHETIC_CLASSES, make_synthetic_coco

HAS_DETECTRON2 = find_spec("detectron2") is not None

__all__ = ["HAS_DETECTRON2", "SYNTHETIC_CLASSES", "make_synthetic_coco"]

if HAS_DETECTRON2:
    from . import detectron2  # noqa: F401  (registers the backbones and datasets)
