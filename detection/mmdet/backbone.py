"""Our SE-ResNet / ResNet / ResNeXt as an MMDetection backbone: `type="SEResNet"` in `mmdet.registry.MODELS`.

Importing this module registers the backbone and lets torch's weights-only unpickler read the checkpoints
MMEngine writes (`runner.allow_mmengine_checkpoints`); MMDetection configs import it with
`custom_imports = dict(imports=["detection.mmdet.backbone"], allow_failed_imports=False)`, so mmdet's own
tools/test.py, `init_detector` and `DetInferencer` load our configs and checkpoints as they are.

`SEResNet` is an mmengine `BaseModule` holding the one ResNet trunk of `backbones` by composition:
`build_trunk(self, ...)` gives it the stem and the stages up to the last of `out_indices`, directly under it.
Its state dict is mmdet's `ResNet` layout (`conv1`, `bn1`, `layer1.0.conv1`, `layer1.0.downsample.1`; norms
named by type as mmdet names them: `gn1` under GroupNorm), plus `layerX.Y.se.fc1/fc2` with SE, so mmdet-zoo
detectors load with `load_from` and mmdet ResNet checkpoints with `init_cfg`. It takes mmdet's `ResNet`
arguments with their meaning (`style`, `with_cp`, `pretrained`, ...; what it does not build, such as `dcn` or
`plugins`, is refused), plus the SE options as one `se` argument, `stem_pool_ceil` and ResNeXt's `groups` /
`base_width`. The plain baselines are this same class with `se=None`, so the SE and plain detectors share one path.

`init_cfg=dict(type="Pretrained", checkpoint=..., prefix=...)` follows mmengine's rules (the prefix is taken
inside the file's `state_dict`; `torchvision://` and `open-mmlab://` name the file mmengine downloads them to)
and reads the weights through our common loader (`backbones.load_pretrained`: every checkpoint format it knows,
all or nothing, the geometry checked).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from urllib.parse import urlparse

import torch
from mmcv.cnn import build_norm_layer
from mmdet.registry import MODELS
from mmengine.model import BaseModule
from mmengine.model.weight_init import initialize
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from backbones import CheckpointError, LoadReport, OptionMismatchError, SEOptions, read_checkpoint
from backbones.checkpoints.loader import load_selection, select_weights
from backbones.models.resnet import STAGES, build_trunk, forward_stem, init_trunk

from ..trunk import DEPTHS, depth_geometry, imagenet_weights, trunk_parts
from ..trunk import config_hint as trunk_config_hint
from .runner import allow_mmengine_checkpoints

allow_mmengine_checkpoints()  # mmdet's tools load checkpoints weights-only once a config imports this module

# Where an mmdet config gives this backbone its ImageNet checkpoint; load errors start with it
INIT_CFG_KEY = "model.backbone.init_cfg"

# The flat option names of `OptionMismatchError.options` and the config keys that set them here
CONFIG_KEYS = {
    "se": "model.backbone.se",
    **{f"se_{name}": f"model.backbone.se.{name}" for name in SEOptions.names()},
    "stride_in_1x1": "model.backbone.style",  # given as pytorch / caffe by `config_hint`
    "stem_pool_ceil": "model.backbone.stem_pool_ceil",
    "layers": "model.backbone.depth",
    "groups": "model.backbone.groups",
    "width_per_group": "model.backbone.base_width",
}
ZOO_SCHEMES = ("torchvision", "modelzoo", "open-mmlab", "openmmlab")  # mmengine's model-zoo names we resolve
_NORM_KEY = r"(^|\.){}(\d)(?=\.)"  # a block's or the stem's norm, `bn1.weight`, `layer1.0.bn3.bias`


def se_options(se: bool | Mapping | SEOptions | None) -> SEOptions | None:
    """The `se` argument as `SEOptions`: a dict of its fields (reduction, squeeze, gate, bias, divisor,
    placement, stages; the paper's values for the rest), True for the paper's SE block, False / None for none."""
    if se is None or se is False:
        return None
    if se is True:
        return SEOptions()
    if isinstance(se, SEOptions):
        return se
    if isinstance(se, Mapping):
        unknown = sorted(set(se) - set(SEOptions.names()))
        if unknown:
            raise ValueError(f"SEResNet se: unknown option(s) {unknown}; valid: {', '.join(SEOptions.names())}")
        return SEOptions(**se)
    raise TypeError(f"SEResNet se={se!r}: give a dict of SE options, True, or None / False for no SE blocks")


def _require(condition: bool, message: str) -> None:
    """mmdet's ResNet asserts its arguments; an AssertionError here too, but one that `python -O` keeps."""
    if not condition:
        raise AssertionError(message)


@MODELS.register_module()
class SEResNet(BaseModule):
    """MMDetection backbone over the `backbones` ResNet trunk: (N, 3, H, W) -> tuple of stage features.

    Output i is stage `out_indices[i]` (0..3 = res2..res5): (N, C_s, H/s, W/s) with strides 4, 8, 16, 32 and
    channels 256, 512, 1024, 2048 for bottleneck depths (64..512 for depths 18/34), as mmdet's `ResNet`.

    Args (mmdet's `ResNet` arguments mean what they mean there):
        depth: 18, 34, 50, 101 or 152 (KeyError otherwise, as mmdet).
        in_channels, stem_channels (default base_channels), num_stages, out_indices (0..num_stages-1; stages
            after the last index are not built), frozen_stages (-1 nothing, 0 the stem, k the stem and stages
            1..k), norm_cfg (mmcv norm config: BN, SyncBN, GN...), norm_eval (BatchNorms kept in eval mode).
        style: "pytorch" (stride 2 in the 3x3 conv) or "caffe" (stride 2 in the first 1x1 conv).
        with_cp: gradient checkpointing per residual block (`torch.utils.checkpoint`): activations recomputed in
            the backward pass instead of stored, for deep backbones (SE-ResNet-152) on small GPUs.
        zero_init_residual: zero the last norm of each block when no pretrained weights are loaded.
        pretrained: deprecated, as in mmdet: a path becomes `init_cfg=dict(type="Pretrained", checkpoint=path)`.
        init_cfg: `dict(type="Pretrained", checkpoint=..., prefix=...)` by mmengine's rules (module docstring);
            further keys (format, ema, trusted, strict, ...) go to `backbones.load_pretrained`; checkpoint None or
            "" trains from scratch; other mmengine initialisers are applied as mmengine does.
        base_channels, strides, dilations, deep_stem, avg_down, conv_cfg, dcn, stage_with_dcn, plugins: only
            mmdet's defaults are built (NotImplementedError otherwise: mmdet's own `ResNet` builds them).
    Ours:
        groups, base_width: ResNeXt's cardinality and width per group (32, 4 for 32x4d).
        stage_blocks: override the four stage depths (tests build tiny networks with (1, 1, 1, 1)).
        se: the SE blocks, `backbones.SEOptions` spelt as a dict (`dict(reduction=16)`, `dict(reduction=8,
            stages=(3, 4), gate="tanh")`; unnamed fields keep the paper's values), True for the paper's block,
            None or False for the plain ResNet.
        stem_pool_ceil: unpadded ceil-mode stem max-pool, as the official Caffe SENet weights (Cadene / timm
            `legacy_se*`, which also need style="caffe"); mmdet's stem pool is padded.
    """

    def __init__(
        self,
        depth: int = 50,
        *,
        in_channels: int = 3,
        stem_channels: int | None = None,
        base_channels: int = 64,
        num_stages: int = 4,
        strides: Sequence[int] = (1, 2, 2, 2),
        dilations: Sequence[int] = (1, 1, 1, 1),
        out_indices: Sequence[int] = (0, 1, 2, 3),
        style: str = "pytorch",
        deep_stem: bool = False,
        avg_down: bool = False,
        frozen_stages: int = -1,
        conv_cfg: dict | None = None,
        norm_cfg: dict | None = None,
        norm_eval: bool = True,
        dcn: dict | None = None,
        stage_with_dcn: Sequence[bool] = (False, False, False, False),
        plugins: list | None = None,
        with_cp: bool = False,
        zero_init_residual: bool = True,
        pretrained: str | None = None,
        init_cfg: dict | list[dict] | None = None,
        groups: int = 1,
        base_width: int = 64,
        stage_blocks: Sequence[int] | None = None,
        se: bool | Mapping | SEOptions | None = True,
        stem_pool_ceil: bool = False,
    ):
        super().__init__(init_cfg)
        if depth not in DEPTHS:
            raise KeyError(f"invalid depth {depth} for resnet: SEResNet depth must be one of {DEPTHS}")
        _require(not (init_cfg and pretrained), "init_cfg and pretrained cannot be specified at the same time")
        if isinstance(pretrained, str):
            warnings.warn('DeprecationWarning: pretrained is deprecated, please use "init_cfg" instead', stacklevel=2)
            self.init_cfg = dict(type="Pretrained", checkpoint=pretrained)
        elif pretrained is not None:
            raise TypeError("pretrained must be a str or None")
        _require(1 <= num_stages <= len(STAGES), f"num_stages={num_stages} must be in 1..{len(STAGES)}")
        _require(len(strides) == len(dilations) == num_stages, "strides and dilations need one entry per stage")
        _require(
            bool(out_indices) and all(i in range(num_stages) for i in out_indices),
            f"out_indices {tuple(out_indices)} must be a non-empty subset of 0..{num_stages - 1} (res2..)",
        )
        _require(style in ("pytorch", "caffe"), f"style={style!r} must be 'pytorch' or 'caffe'")
        _require(-1 <= frozen_stages <= num_stages, f"frozen_stages={frozen_stages} must be in -1..{num_stages}")
        unsupported = {
            "base_channels": base_channels != 64,
            "strides": tuple(strides) != (1, 2, 2, 2)[:num_stages],
            "dilations": any(d != 1 for d in dilations),
            "deep_stem": deep_stem,
            "avg_down": avg_down,
            "conv_cfg": conv_cfg not in (None, dict(type="Conv"), dict(type="Conv2d")),
            "dcn": dcn is not None,
            "plugins": bool(plugins),
        }
        if any(unsupported.values()):
            names = ", ".join(k for k, v in unsupported.items() if v)
            raise NotImplementedError(
                f"SEResNet builds no {names} other than mmdet's default; mmdet's own ResNet / ResNetV1d / "
                "ResNeXt do (without SE blocks)"
            )
        geometry = depth_geometry(depth, "SEResNet depth")
        if stage_blocks is not None:
            geometry["layers"] = tuple(stage_blocks)
        norm_cfg = dict(type="BN", requires_grad=True) if norm_cfg is None else dict(norm_cfg)
        self.norm_layer = partial(_norm_layer, norm_cfg)
        self.norm_abbr = build_norm_layer(norm_cfg, stem_channels or base_channels)[0]  # mmdet's: bn, gn, ...
        self.feature_info = build_trunk(
            self,
            num_stages=max(out_indices) + 1,
            **geometry,
            groups=groups,
            width_per_group=base_width,
            se=se_options(se),
            stride_in_1x1=style == "caffe",
            stem_pool_ceil=stem_pool_ceil,
            stem_width=stem_channels or base_channels,
            norm_layer=self.norm_layer,
            in_chans=in_channels,
        )
        init_trunk(self, zero_init_last=zero_init_residual)
        if self.norm_abbr != "bn":  # our modules are bn1..bn3 whatever the norm; mmdet's files say gn1...
            self.register_state_dict_post_hook(partial(_rename_norms, "bn", self.norm_abbr))
            self.register_load_state_dict_pre_hook(partial(_rename_norms, self.norm_abbr, "bn"))
        self.depth = depth
        self.style = style
        self.out_indices = tuple(out_indices)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.with_cp = with_cp
        self.out_channels = tuple(self.feature_info[i]["channels"] for i in self.out_indices)
        self.strides = tuple(self.feature_info[i]["stride"] for i in self.out_indices)
        self._freeze_stages()

    def _freeze_stages(self) -> None:
        """As mmdet's ResNet: the stem (frozen_stages >= 0) and layer1..layer{frozen_stages} in eval mode,
        without gradients."""
        for names in trunk_parts(self)[: self.frozen_stages + 1]:
            for name in names:
                module = getattr(self, name)
                module.eval()
                for param in module.parameters():
                    param.requires_grad = False

    def train(self, mode: bool = True) -> SEResNet:
        """Train mode, except frozen stages (always eval) and, with `norm_eval`, every BatchNorm."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    def init_weights(self) -> None:
        """Load `init_cfg`'s Pretrained checkpoint through our loader; without one keep the He init of
        construction (mmengine would otherwise re-run its own init and undo zero_init_residual)."""
        cfgs = [] if not self.init_cfg else self.init_cfg if isinstance(self.init_cfg, list) else [self.init_cfg]
        pretrained = [c for c in cfgs if c.get("type") == "Pretrained"]
        others = [c for c in cfgs if c.get("type") != "Pretrained"]
        if others:
            initialize(self, others)
        for cfg in pretrained:
            if not cfg.get("checkpoint"):
                continue  # checkpoint None / "": from scratch, like detectron2's MODEL.WEIGHTS ""
            options = {k: v for k, v in cfg.items() if k not in ("type", "checkpoint")}
            try:
                source, stride_in_1x1 = zoo_file(cfg["checkpoint"])
                load = partial(load_as_mmengine, norm_abbr=self.norm_abbr, stride_in_1x1=stride_in_1x1)
                weights, _ = imagenet_weights(self, source, norm_layer=self.norm_layer, load=load, **options)
            except OptionMismatchError as e:
                message = f"{INIT_CFG_KEY}: {e}{config_hint(e, self.arch['block'])}"
                raise OptionMismatchError(message, e.options) from None
            except CheckpointError as e:  # the file is named; the config key that named it is said here
                e.args = (f"{INIT_CFG_KEY}: {e}",)
                raise
            own = {**dict(self.named_parameters()), **dict(self.named_buffers())}
            self.load_state_dict({**own, **weights})  # every key checked above: all or nothing
        self._is_init = True

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(N, 3, H, W) -> tuple of (N, C_s, H/s, W/s), one per entry of `out_indices`."""
        x = forward_stem(self, x)
        # as mmdet's with_cp, BatchNorms in train mode then update their statistics twice per step
        use_cp = self.with_cp and torch.is_grad_enabled()
        outs = []
        for i in range(len(self.feature_info)):
            for block in getattr(self, f"layer{i + 1}"):
                x = checkpoint(block, x, use_reentrant=False) if use_cp else block(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)


def _norm_layer(cfg: dict, channels: int) -> torch.nn.Module:
    return build_norm_layer(cfg, channels)[1]


def _rename_norms(old: str, new: str, *args) -> None:
    """State-dict hook: norm keys `{old}N` -> `{new}N` under the hook's prefix, in place and in order.

    Registered both as a state-dict post hook (module, state_dict, prefix, metadata) and as a load pre hook
    (module, state_dict, prefix, ...): the state dict and its prefix are the two arguments after the module."""
    state_dict, prefix = args[1], args[2]
    pattern = re.compile(_NORM_KEY.format(old))
    items = list(state_dict.items())
    state_dict.clear()
    for key, value in items:
        if key.startswith(prefix):
            key = prefix + pattern.sub(rf"\g<1>{new}\g<2>", key[len(prefix) :])
        state_dict[key] = value


def zoo_file(name: str) -> tuple[str, bool | None]:
    """`init_cfg` checkpoint -> (file to read, stride position its weights need, or None when unknown).

    mmengine's model-zoo names (`torchvision://resnet50`, `open-mmlab://detectron2/resnet50_caffe`) are the
    file mmengine would have downloaded into torch's hub cache; nothing is downloaded here. Their geometry is
    known: the `*caffe*` weights of the zoo put the stride in the first 1x1 conv, all others in the 3x3.
    Other names (paths, URLs) pass unchanged.
    """
    scheme, sep, model = str(name).partition("://")
    if not sep or scheme not in ZOO_SCHEMES:
        return name, None
    from mmengine.runner import checkpoint as mm

    if scheme in ("torchvision", "modelzoo"):
        urls = mm.get_torchvision_models()
    else:
        model = mm.get_deprecated_model_names().get(model, model)
        urls = mm.get_external_models()
    if model not in urls:
        known = ", ".join(sorted(urls)[:6])
        raise CheckpointError(f"{name}: mmengine's model zoo has no {model!r} (it has {known}, ...)")
    url = urls[model]
    path = Path(torch.hub.get_dir(), "checkpoints", Path(urlparse(url).path).name)
    if not path.is_file():
        raise CheckpointError(
            f"{name}: its file {path} (torch's hub cache, where mmengine keeps {url}) is not there, and nothing is "
            "downloaded here; download that URL into the cache (or set TORCH_HOME to where it is), or give the "
            "checkpoint's local path"
        )
    return str(path), "caffe" in model


def load_as_mmengine(
    model: torch.nn.Module,
    source,
    *,
    norm_abbr: str = "bn",
    stride_in_1x1: bool | None = None,
    prefix: str | None = None,
    map_location="cpu",
    trusted: bool = False,
    format: str | None = None,
    ema: bool = False,
    **load_options,
) -> LoadReport:
    """`backbones.load_pretrained` with mmengine's and mmdet's conventions for what the file does not say.

    - `prefix` is looked up inside the file's `state_dict`, when it has one (`prefix="backbone."` on a
      detector checkpoint), as mmengine's Pretrained init does;
    - mmdet's norm names by type (`gn1`) are our `bn1`;
    - weights with plain ResNet names (torchvision's, which mmdet's ResNet uses) carry no stride position: the
      config's `style` states it, as in mmdet, unless the file is a model-zoo name whose style is known.
    """
    checkpoint = read_checkpoint(source, map_location=map_location, trusted=trusted)
    if norm_abbr != "bn":
        pattern = re.compile(_NORM_KEY.format(norm_abbr))
        tensors = {pattern.sub(r"\g<1>bn\g<2>", k): v for k, v in checkpoint.tensors.items()}
        checkpoint = dataclasses.replace(checkpoint, tensors=tensors)
    if prefix and any(k.startswith("state_dict.") for k in checkpoint.tensors):
        prefix = f"state_dict.{prefix}"
    sel = select_weights(checkpoint, model.state_dict(), format=format, ema=ema, prefix=prefix)
    if sel.scheme.name == "torchvision" and "stride_in_1x1" in sel.geometry:
        if stride_in_1x1 is None:
            del sel.geometry["stride_in_1x1"]
        else:
            sel.geometry["stride_in_1x1"] = stride_in_1x1
    return load_selection(model, checkpoint, sel, **load_options)


def config_hint(error: OptionMismatchError, block: str = "bottleneck") -> str:
    """The `--cfg-options` to set, `key=value`, for the options the weights need (`error.options`)."""
    options = dict(error.options)
    if "stride_in_1x1" in options:
        options["stride_in_1x1"] = "caffe" if options["stride_in_1x1"] else "pytorch"
    return trunk_config_hint(options, CONFIG_KEYS, block, where="the mmdet config (--cfg-options)", assign="=")
