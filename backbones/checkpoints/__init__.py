"""Checkpoints: reading any file safely (`files`), peer key schemes (`formats`), loading into a model all or
nothing (`loader`), and writing ours and detectron2's formats (`export`). Nothing here builds a model by name:
that is `backbones.factory`, above both this package and the registry."""

from .export import save_checkpoint, save_detectron2, to_detectron2
from .files import CheckpointError, UntrustedCheckpointError, read_checkpoint
from .loader import LoadReport, OptionMismatchError, load_pretrained

__all__ = [
    "CheckpointError",
    "LoadReport",
    "OptionMismatchError",
    "UntrustedCheckpointError",
    "load_pretrained",
    "read_checkpoint",
    "save_checkpoint",
    "save_detectron2",
    "to_detectron2",
]
