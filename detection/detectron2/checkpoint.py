"""MODEL.WEIGHTS for SE-ResNet detectors: our ImageNet checkpoints converted on load, never a partial backbone.

`SENetCheckpointer` is detectron2's `DetectionCheckpointer` with atomic saves, plus two rules for loading:

- A file without detector weights (our safetensors + JSON, a `tools/convert_checkpoint.py --to detectron2` .pkl,
  timm / torchvision / Cadene / mmpretrain ImageNet weights: anything `backbones.load_pretrained` reads) is an
  ImageNet backbone checkpoint. It is loaded through that common loader into a twin of the detector's ResNet
  (which checks key names, shapes and the geometry no shape shows: stride position, stem pool, SE function),
  its preprocessing is checked against INPUT.FORMAT / MODEL.PIXEL_MEAN / MODEL.PIXEL_STD, and its weights are
  handed to detectron2 under the detector's names (`backbone.bottom_up.` + our key). Weights that need other
  options (the loader's `OptionMismatchError.options`: se_reduction, stride_in_1x1...) name the config keys to
  set, `KEY VALUE` (MODEL.SENET.REDUCTION 8), through `CONFIG_KEYS`.
- Whatever the file, every backbone tensor must be in it with the right shape, or nothing is loaded: detectron2
  itself only logs missing keys and skips mismatched shapes, which would leave a silently random backbone.
- A detector checkpoint (a model_final.pth, a detectron2-zoo detector) must moreover cover the whole model: every
  tensor of it, FPN and heads included, with the right shape, or nothing is loaded. An `--eval-only` of a detector
  whose FPN or head widths differ would otherwise evaluate random heads and report AP 0. Fine-tuning from a
  detector with other heads (another NUM_CLASSES) sets MODEL.ALLOW_PARTIAL_WEIGHTS True (`allow_partial`):
  then only the backbone must be covered, and the heads detectron2 skips keep their initialisation.
"""

from __future__ import annotations

import logging
import os
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts

from backbones import CheckpointError, OptionMismatchError, SEOptions, read_checkpoint
from backbones.checkpoints.export import IMAGENET_PREPROCESSING
from backbones.checkpoints.files import Checkpoint
from backbones.fileio.atomic import atomic_write

from ..trunk import config_hint as trunk_config_hint
from ..trunk import imagenet_weights
from .backbone import SEResNet

log = logging.getLogger(__name__)

# `__author__` of the backbone weights `_convert_backbone` makes of an ImageNet checkpoint: they cover the backbone
# only, by design
CONVERTED = "senet-suite"

# The flat option names of `OptionMismatchError.options` and the config keys that set them here
CONFIG_KEYS = {
    "se": "MODEL.SENET.ENABLED",
    **{f"se_{name}": f"MODEL.SENET.{name.upper()}" for name in SEOptions.names()},
    "stride_in_1x1": "MODEL.RESNETS.STRIDE_IN_1X1",
    "stem_pool_ceil": "MODEL.SENET.STEM_POOL_CEIL",
    "layers": "MODEL.RESNETS.DEPTH",
    "groups": "MODEL.RESNETS.NUM_GROUPS",
    "width_per_group": "MODEL.RESNETS.WIDTH_PER_GROUP",
}


def check_weights_file(path: str) -> None:
    """Raise CheckpointError unless MODEL.WEIGHTS is '' (from scratch), a URL or a readable local file."""
    local = urlparse(path or "")._replace(query="").geturl()
    if not path or urlparse(local).scheme:
        return  # URLs and detectron2:// names are fetched by the load itself
    if not os.path.isfile(local):
        raise CheckpointError(
            f"MODEL.WEIGHTS={path!r}: no such file. Put the ImageNet checkpoint there (any format "
            "backbones.load_pretrained reads; see tools/convert_checkpoint.py), or pass MODEL.WEIGHTS '' to "
            "train from scratch."
        )
    if not os.access(local, os.R_OK):
        raise CheckpointError(f"MODEL.WEIGHTS={path!r}: the file is not readable by this user (check its permissions)")


class SENetCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that also reads ImageNet backbone checkpoints and refuses partial loads.

    `allow_partial` (MODEL.ALLOW_PARTIAL_WEIGHTS) lets a detector checkpoint miss, or mismatch, tensors outside
    the backbone; the backbone must be covered whatever it says.
    """

    def __init__(self, model: Any, save_dir: str = "", *, allow_partial: bool = False, **checkpointables: Any):
        super().__init__(model, save_dir, **checkpointables)
        self.allow_partial = allow_partial

    def load(self, path: str, *args: Any, **kwargs: Any) -> dict:
        check_weights_file(path)
        return super().load(path, *args, **kwargs)

    def save(self, name: str, **kwargs: Any) -> None:
        """Checkpointer.save, through a temporary file renamed into place: a run killed mid-save (or a full disk)
        leaves every earlier checkpoint, and the `last_checkpoint` naming one, whole. fvcore writes in place,
        and a resumed run rewrites model_final.pth, the very file `last_checkpoint` names."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", path)
        atomic_write(path, lambda tmp: torch.save(data, tmp))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write(os.path.join(self.save_dir, "last_checkpoint"), lambda tmp: tmp.write_text(last_filename_basename))

    def _load_file(self, filename: str) -> dict:
        self._filename = filename
        checkpoint = read_checkpoint(filename)  # sniffs the format; plain pickles go through a numpy-only unpickler
        if not self._is_detector_checkpoint(checkpoint):
            return self._convert_backbone(checkpoint)
        if checkpoint.file_format in ("detectron2", "pickle"):
            # detectron2 would read a .pkl again with plain pickle.load, which runs whatever code the file names
            return _detectron2_pickle(checkpoint)
        return super()._load_file(filename)  # torch files: torch.load, weights-only, keeps iteration and optimizer

    def _load_model(self, checkpoint: dict) -> Any:
        if checkpoint.get("matching_heuristics", False):  # align names first, so the check sees the final keys
            self._convert_ndarray_to_tensor(checkpoint["model"])
            checkpoint["model"] = align_and_update_state_dicts(
                self.model.state_dict(), checkpoint["model"], c2_conversion=checkpoint.get("__author__") == "Caffe2"
            )
            checkpoint["matching_heuristics"] = False
        self._check_backbone_covered(checkpoint["model"])
        if checkpoint.get("__author__") != CONVERTED and not self.allow_partial:
            self._check_model_covered(checkpoint["model"])
        return super()._load_model(checkpoint)

    # ------------------------------------------------------------------------------------------------------

    def _backbone(self) -> tuple[SEResNet | None, str]:
        """(our ResNet in the model, its key prefix), or (None, "") when the model has none."""
        for name, module in self.model.named_modules():
            if isinstance(module, SEResNet):
                return module, f"{name}." if name else ""
        return None, ""

    def _backbone_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every tensor of our ResNet in the model, under the model's names."""
        resnet, prefix = self._backbone()
        if resnet is None:
            return {}
        return {
            prefix + k: tuple(v.shape) for k, v in resnet.state_dict().items() if not k.endswith("num_batches_tracked")
        }

    def _is_detector_checkpoint(self, checkpoint: Checkpoint) -> bool:
        """Detector weights (e.g. a model_final.pth) rather than an ImageNet backbone checkpoint."""
        if checkpoint.record is not None:
            return False  # ours: safetensors + JSON record or a converted .pkl with "__senet__"
        heads = {name for name, _ in self.model.named_children()} - {"backbone"}
        for key in checkpoint.tensors:
            key = key.removeprefix("model.").removeprefix("module.")
            if key.split(".", 1)[0] in heads:
                return True
        return checkpoint.file_format == "detectron2"  # a detectron2-zoo backbone .pkl: its own names

    def _convert_backbone(self, checkpoint: Checkpoint) -> dict:
        resnet, prefix = self._backbone()
        if resnet is None:
            raise CheckpointError(
                f"{checkpoint.path}: an ImageNet backbone checkpoint, but the model has no SE-ResNet backbone "
                "(MODEL.BACKBONE.NAME build_se_resnet_fpn_backbone or build_se_resnet_backbone) to load it into"
            )
        self._check_preprocessing(checkpoint)
        try:
            weights, report = imagenet_weights(resnet, checkpoint)
        except OptionMismatchError as e:
            raise OptionMismatchError(f"MODEL.WEIGHTS {e}{config_hint(e, resnet.arch['block'])}", e.options) from None
        except CheckpointError as e:
            raise CheckpointError(f"MODEL.WEIGHTS {e}") from None
        log.info("ImageNet backbone: %s", report.summary())
        weights = {prefix + k: v for k, v in weights.items() if not k.endswith("num_batches_tracked")}
        return {"model": weights, "__author__": CONVERTED, "matching_heuristics": False}

    def _check_preprocessing(self, checkpoint: Checkpoint) -> None:
        """The input the weights were trained on must be what the detector feeds them."""
        fmt = getattr(self.model, "input_format", None)
        mean, std = getattr(self.model, "pixel_mean", None), getattr(self.model, "pixel_std", None)
        if fmt is None or mean is None or std is None:
            return
        record = checkpoint.record or {}
        pre = record.get("preprocessing") or IMAGENET_PREPROCESSING  # all published schemes: ImageNet RGB
        order = pre["channel_order"]
        want_mean = [round(255 * m, 3) for m in pre["mean"]]
        want_std = [round(255 * s, 3) for s in pre["std"]]
        have_mean, have_std = mean.flatten().tolist(), std.flatten().tolist()
        if fmt == order and np.allclose(have_mean, want_mean, atol=0.1) and np.allclose(have_std, want_std, atol=0.1):
            return
        source = "as recorded with it" if record.get("preprocessing") else "as all ImageNet weights of that scheme"
        raise CheckpointError(
            f"MODEL.WEIGHTS {checkpoint.path}: the weights expect {order} input with mean {want_mean} and std "
            f"{want_std} (0-255 units, {source}), but the config feeds {fmt} with mean "
            f"{[round(v, 3) for v in have_mean]} and std {[round(v, 3) for v in have_std]}; nothing was loaded. "
            f"Set INPUT.FORMAT {order} MODEL.PIXEL_MEAN {want_mean} MODEL.PIXEL_STD {want_std}."
        )

    def _check_backbone_covered(self, weights: dict) -> None:
        expected = self._backbone_shapes()
        if not expected:
            return
        missing, wrong = _not_covered(expected, weights)
        if not missing and not wrong:
            return
        where = getattr(self, "_filename", "the checkpoint")
        lines = []
        if missing:
            lines.append(f"  missing ({len(missing)} of {len(expected)}): {_few(missing)}")
        if wrong:
            lines.append(f"  shapes checkpoint vs model ({len(wrong)}): {_few(wrong)}")
        raise CheckpointError(
            f"{where}: these weights do not cover the SE-ResNet backbone of this model; nothing was loaded.\n"
            + "\n".join(lines)
            + "\nIs it a detector of another architecture, or a backbone in detectron2's own names (res2.0.conv1)? "
            "Pass an ImageNet checkpoint backbones.load_pretrained reads (or one converted with "
            "tools/convert_checkpoint.py --to detectron2), or MODEL.WEIGHTS '' to train from scratch."
        )

    def _check_model_covered(self, weights: dict) -> None:
        """Every tensor of the model in `weights` with its shape, else CheckpointError before anything is loaded."""
        expected = {
            k: tuple(v.shape) for k, v in self.model.state_dict().items() if not k.endswith("num_batches_tracked")
        }
        missing, wrong = _not_covered(expected, weights)
        if not missing and not wrong:
            return
        where = getattr(self, "_filename", "the checkpoint")
        found = []
        if missing:
            found.append(f"{len(missing)} of {len(expected)} tensors missing: {_few(missing, 4)}")
        if wrong:
            found.append(f"{len(wrong)} of other shape (checkpoint vs model): {_few(wrong, 4)}")
        raise CheckpointError(
            f"{where}: a detector checkpoint that does not fit this model; nothing was loaded. "
            + "; ".join(found)
            + ". Use the config it was trained with (FPN / head widths, NUM_CLASSES), or set "
            "MODEL.ALLOW_PARTIAL_WEIGHTS True to fine-tune from it, leaving what does not fit initialised."
        )


def _not_covered(expected: dict[str, tuple[int, ...]], weights: dict) -> tuple[list[str], list[str]]:
    """(keys of `expected` missing from `weights`, "key (checkpoint shape) vs (model shape)" of the others)."""
    keys = {k.removeprefix("module."): v for k, v in weights.items()}
    missing = [k for k in expected if k not in keys]
    wrong = [
        f"{k} {tuple(keys[k].shape)} vs {shape}"
        for k, shape in expected.items()
        if k in keys and tuple(keys[k].shape) != shape
    ]
    return missing, wrong


def _detectron2_pickle(checkpoint: Checkpoint) -> dict:
    """What DetectionCheckpointer._load_file makes of a detector .pkl, from the tensors of our safe read.

    A detectron2-format file ({"model", "__author__", ...}) gives its "model"; any other pickle is taken, as
    detectron2 takes it, for a Caffe2 / Detectron1 one: its tensors but the "_momentum" ones, matched by name
    heuristics ("blobs" files hold no detector names, so they are ImageNet backbones here). The safe read keeps
    tensors only, so a detectron2-format file's own `matching_heuristics` is not seen: its names are used as
    they are, as detectron2-zoo detectors ask; backbones in detectron2's names (whose converters ask for
    heuristics) never cover our SE-ResNet either way.
    """
    if checkpoint.file_format == "detectron2":
        model = {k.removeprefix("model."): v for k, v in checkpoint.tensors.items() if k.startswith("model.")}
        return {"model": model, "__author__": "detectron2 .pkl", "matching_heuristics": False}
    model = {k: v for k, v in checkpoint.tensors.items() if not k.endswith("_momentum")}
    return {"model": model, "__author__": "Caffe2", "matching_heuristics": True}


def config_hint(error: OptionMismatchError, block: str = "bottleneck") -> str:
    """The config keys to set, `KEY VALUE`, for the options the weights need (`error.options`)."""
    return trunk_config_hint(error.options, CONFIG_KEYS, block, where="the detectron2 config", assign=" ")


def _few(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")
