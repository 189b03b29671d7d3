"""The one ImageNet checkpoint loader: any peer project's weights into our models, all or nothing.

`load_pretrained(model, source)` reads a file (`checkpoint_files`: torch .pth/.pt/.bin/.ckpt, safetensors,
our safetensors + JSON checkpoint, our detectron2 .pkl) or an in-memory state dict, finds the weights inside
whatever wraps them (Lightning `state_dict` + attribute prefix, DDP `module.`, torch.compile `_orig_mod.`, EMA
copies), maps the key scheme onto our names (`checkpoint_formats`), checks the geometry no shape shows
(Caffe-style stride and stem pool, SE function), validates every shape, and only then copies the weights in.
On any error the model is untouched. `create_pretrained(name, source)` builds the model the checkpoint
needs, then loads it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .checkpoint_files import Checkpoint, CheckpointError, read_checkpoint
from .checkpoint_formats import (
    SE_FC1_BIAS,
    SE_FC1_WEIGHT,
    KeyScheme,
    detect_scheme,
    get_scheme,
    has_se,
    is_se_key,
    map_state_dict,
    source_geometry,
    unsupported,
)
from .registry import create_model, model_config, model_options
from .resnet import Bottleneck
from .se import SqueezeExcite, se_hidden_channels

log = logging.getLogger(__name__)

CLASSIFIER = "fc."
_EMA_PART = re.compile(r"(^|_)ema(_|$)", re.IGNORECASE)
_STYLE_OPTIONS = ("style", "stride_in_1x1", "stem_pool_ceil")  # setting style decides the other two


@dataclass
class Selection:
    """The weights chosen inside a checkpoint, already renamed to our keys."""

    state_dict: dict[str, torch.Tensor]
    scheme: KeyScheme
    prefix: str
    ema: bool
    geometry: dict


@dataclass
class LoadReport:
    """What `load_pretrained` did: which keys loaded, which were missing or unexpected, and why."""

    source: str
    format: str  # key scheme: ours, torchvision, timm, cadene, mmpretrain, moskomule
    file_format: str
    prefix: str  # where the weights sat in the file, e.g. "state_dict.model." for a Lightning checkpoint
    ema: bool
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    classifier_dropped: str | None = None  # why the checkpoint's classifier was not loaded

    def summary(self) -> str:
        where = f" under {self.prefix!r}" if self.prefix else ""
        ema = ", EMA weights" if self.ema else ""
        kind = f"{self.format} names, {self.file_format} file{where}{ema}"
        text = f"loaded {len(self.loaded)} tensors from {self.source} ({kind})"
        if self.missing:
            text += f"; {len(self.missing)} missing (kept at initialisation): {_few(self.missing)}"
        if self.unexpected:
            text += f"; {len(self.unexpected)} unexpected (ignored): {_few(self.unexpected)}"
        if self.classifier_dropped:
            text += f"; classifier dropped: {self.classifier_dropped}"
        return text


# ----------------------------------------------------------------------------------------- choosing weights


def select_weights(
    checkpoint: Checkpoint,
    target_keys: Iterable[str],
    *,
    format: str | None = None,
    ema: bool = False,
    prefix: str | None = None,
) -> Selection:
    """Find the weights for a model with `target_keys` inside `checkpoint` and rename them to our keys.

    Every prefix that leads to a stem conv (and each of its parents) is a candidate: "" for a plain state dict,
    "module." (DDP), "_orig_mod." (torch.compile), "state_dict.model." (Lightning), "state_dict_ema."... Each
    candidate's keys are mapped with their detected (or the forced) scheme and scored by how many land on the
    model's keys. The best wins; EMA candidates (a path part "ema", "model_ema", "state_dict_ema"...) only when
    `ema=True`, or when the file holds nothing else.
    """
    ordered = list(target_keys)
    target = set(ordered)
    tensors = _strip_compile_wrappers(checkpoint)
    if prefix is not None:
        candidates = {prefix if prefix.endswith(".") or not prefix else f"{prefix}."}  # "teacher" = "teacher."
    else:
        anchors = {"conv1.weight", *ordered[:1]}
        candidates = {""}
        for key in tensors:
            for anchor in anchors:
                if key.endswith(anchor) and (key == anchor or key[-len(anchor) - 1] == "."):
                    parts = key[: -len(anchor)].split(".")[:-1]
                    candidates.update(".".join(parts[:i]) + "." for i in range(1, len(parts) + 1))
    use_record = format is None and checkpoint.record is not None
    found = []
    for cand in sorted(candidates):
        sub = {k[len(cand) :]: v for k, v in tensors.items() if k.startswith(cand)}
        scheme = get_scheme("ours" if use_record else format) if (use_record or format) else detect_scheme(sub)
        try:
            mapped = map_state_dict(sub, scheme)
        except ValueError:
            continue
        score = sum(k in target for k in mapped)
        stray = sum(k not in target and not k.startswith(CLASSIFIER) for k in mapped)
        if score:
            # rank: most keys landing on the model, then fewest strays, then the outermost prefix
            found.append(((score, -stray, -len(cand)), cand, scheme, mapped))
    if not found:
        raise CheckpointError(
            f"{checkpoint.path}: found no weights for this model among its {len(tensors)} tensors"
            + (f" under prefix {next(iter(candidates))!r}" if prefix is not None else "")
            + f" (first keys: {_few(list(tensors), 5)}); is it a checkpoint of another architecture?"
        )
    is_ema = {cand: any(_EMA_PART.search(part) for part in cand.split(".")) for _, cand, _, _ in found}
    pool = [f for f in found if is_ema[f[1]] == ema]
    if not pool and ema:
        raise CheckpointError(
            f"{checkpoint.path}: ema=True but the file has no EMA weights (looked for prefixes such as "
            f"state_dict_ema., model_ema.); weights found under: {_few([f[1] or '<top level>' for f in found])}"
        )
    if not pool:
        log.info("%s holds only EMA weights: loading those", checkpoint.path)
        pool = found
    pool.sort(key=lambda f: f[0], reverse=True)
    best = pool[0]
    # the same weights seen through a longer prefix are no rival; another subtree as good as the best is
    rivals = [f[1] for f in pool[1:] if f[0][:2] == best[0][:2] and not f[1].startswith(best[1])]
    if rivals:
        raise CheckpointError(
            f"{checkpoint.path}: weights for this model appear under several prefixes "
            f"({', '.join(repr(p) for p in [best[1], *rivals])}); pass prefix=... (--prefix) to choose one"
        )
    _, cand, scheme, mapped = best
    if scheme.name == "ours" and checkpoint.record is not None:
        geometry = dict(checkpoint.record.get("geometry", {}))
    else:
        geometry = source_geometry(scheme, mapped)
    return Selection(mapped, scheme, cand, is_ema[cand], geometry)


def _strip_compile_wrappers(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """The tensors with torch.compile's inner `._orig_mod.` dropped; two keys that become one are an error."""
    out: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    for key, value in checkpoint.tensors.items():
        new = key.replace("._orig_mod.", ".")
        if new in out:
            raise CheckpointError(
                f"{checkpoint.path}: keys {source[new]!r} and {key!r} both become {new!r} once torch.compile's "
                "'_orig_mod.' is dropped; which one holds the weights is ambiguous"
            )
        out[new], source[new] = value, key
    return out


def _unwrap_model(model: nn.Module) -> nn.Module:
    """The module that owns the weights inside DataParallel / DistributedDataParallel (`.module`) and
    torch.compile (`._orig_mod`) wrappers, whose state dicts prefix every key."""
    while True:
        if isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def meta_model(cls: type[nn.Module], kwargs: Mapping[str, Any]) -> nn.Module:
    """`cls(**kwargs)` on the meta device: its key names, shapes and geometry cost no memory and no init."""
    with torch.device("meta"):
        return cls(**kwargs)


def model_geometry(model: nn.Module) -> dict:
    """What a model computes that its weight shapes do not show: stride position, stem pool and SE function."""
    geometry: dict = {}
    if hasattr(model, "stem_pool_ceil"):
        geometry["stem_pool_ceil"] = bool(model.stem_pool_ceil)
    if hasattr(model, "stride_in_1x1") and any(isinstance(m, Bottleneck) for m in model.modules()):
        geometry["stride_in_1x1"] = bool(model.stride_in_1x1)
    se = next((m for m in model.modules() if isinstance(m, SqueezeExcite)), None)
    if se is not None:
        geometry.update(se_squeeze=se.squeeze, se_gate=se.gate_name)
    for m in model.modules():
        if getattr(m, "se_placement", None) and (m.se is not None or m.se_3x3 is not None):
            geometry["se_placement"] = m.se_placement
            break
    return geometry


# ---------------------------------------------------------------------------------------------- loading


def load_pretrained(
    model: nn.Module,
    source: Any,
    *,
    strict: bool = True,
    map_location: Any = "cpu",
    trusted: bool = False,
    format: str | None = None,
    ema: bool = False,
    prefix: str | None = None,
) -> LoadReport:
    """Load `source` (path, URL, state dict or `Checkpoint`) into `model`, all or nothing, and report it.

    format: force a key scheme (`checkpoint_formats.SCHEMES`) instead of detecting it; "ours" also means
        "these plain-named weights come from this suite's model: trust the model's geometry".
    ema: load the EMA copy (`state_dict_ema`, `model_ema`, ...) instead of the raw weights.
    prefix: take the weights under this flattened key prefix ("teacher" or "teacher.") when several candidates tie.
    strict: refuse missing or unexpected keys (the classifier follows its own rule: it is loaded when its
        class count matches the model's and dropped, with a note in the report, otherwise).
    Raises `CheckpointError` naming the file (and key and both shapes) on any problem; the model is then unchanged.
    """
    model = _unwrap_model(model)
    checkpoint = read_checkpoint(source, map_location=map_location, trusted=trusted)
    current = model.state_dict()
    sel = select_weights(checkpoint, current, format=format, ema=ema, prefix=prefix)
    where = checkpoint.path
    reason = unsupported(sel.scheme, sel.state_dict)
    if reason:
        raise CheckpointError(f"{where}: {reason}")
    _check_geometry(where, sel, model_geometry(model))
    report = LoadReport(where, sel.scheme.name, checkpoint.file_format, sel.prefix, sel.ema)
    weights, report.classifier_dropped = _classifier_policy(sel.state_dict, current)
    mismatched = [k for k, v in weights.items() if k in current and v.shape != current[k].shape]
    if mismatched:
        lines = [f"  {k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(current[k].shape)}" for k in mismatched]
        hints = _unique(_shape_hint(k, weights[k].shape, current[k].shape) for k in mismatched)
        raise CheckpointError(
            f"{where}: {len(mismatched)} tensor(s) do not fit the model; nothing was loaded.\n"
            + "\n".join(lines[:10] + (["  ..."] if len(lines) > 10 else []) + hints)
        )
    benign = ("num_batches_tracked",)  # absent from old checkpoints; the model keeps its counter
    file_head = any(_is_head(k) for k in sel.state_dict)
    # a dropped or absent head is reported on its own; a kept one must be whole (fc.weight without fc.bias is not)
    head_kept = file_head and report.classifier_dropped is None
    report.missing = [
        k for k in current if k not in weights and not k.endswith(benign) and (head_kept or not _is_head(k))
    ]
    report.unexpected = [k for k in weights if k not in current]
    if strict and (report.missing or report.unexpected):
        raise CheckpointError(
            f"{where}: the {sel.scheme.name} weights do not match the model's keys; nothing was loaded.\n"
            f"  missing from the checkpoint ({len(report.missing)}): {_few(report.missing, 8)}\n"
            f"  not in the model ({len(report.unexpected)}): {_few(report.unexpected, 8)}\n"
            + _key_hint(report.missing, report.unexpected, weights, current)
            + "\n(strict=False loads the keys that match and reports the rest)"
        )
    if not file_head:  # no head in the file: the model's keeps its init
        report.missing += [k for k in current if _is_head(k)]
    report.loaded = [k for k in weights if k in current]
    # keys and shapes are checked and dtype / device conversions done up front: this copy cannot stop half-way
    staged = _as_model_tensors(where, {k: weights[k] for k in report.loaded}, current)
    model.load_state_dict({**current, **staged})
    problems = report.missing or report.unexpected or report.classifier_dropped
    log.log(logging.WARNING if problems else logging.INFO, report.summary())
    return report


def _is_head(key: str) -> bool:
    return key.startswith(CLASSIFIER)


def _as_model_tensors(
    where: str, weights: dict[str, torch.Tensor], current: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """`weights` in the model's dtype and on its device, or a `CheckpointError` before any tensor is copied."""
    out = {}
    for k, v in weights.items():
        try:
            out[k] = v.to(device=current[k].device, dtype=current[k].dtype)
        except (RuntimeError, NotImplementedError) as e:  # e.g. a meta tensor, an out-of-memory device
            raise CheckpointError(
                f"{where}: {k} ({v.dtype} on {v.device}) cannot become the model's {current[k].dtype} on "
                f"{current[k].device}; nothing was loaded: {e}"
            ) from e
    return out


def _classifier_policy(
    weights: dict[str, torch.Tensor], current: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], str | None]:
    """The checkpoint's classifier is kept when it fits the model's, else dropped with the reason why."""
    head = {k: v for k, v in weights.items() if _is_head(k)}
    model_head = {k: v for k, v in current.items() if _is_head(k)}
    if not head:
        return weights, None
    if not model_head:
        reason = f"the model has no classifier; the checkpoint's {_classes(head)}-class head is unused"
    elif any(k not in model_head or v.shape != model_head[k].shape for k, v in head.items()):
        reason = (
            f"the checkpoint has {_classes(head)} classes, the model {_classes(model_head)}: "
            "the model's classifier keeps its initialisation"
        )
    else:
        return weights, None
    return {k: v for k, v in weights.items() if k not in head}, reason


def _check_geometry(where: str, sel: Selection, actual: dict) -> None:
    needed = {k: v for k, v in sel.geometry.items() if k in actual and actual[k] != v}
    if not needed:
        return
    has = ", ".join(f"{k}={actual[k]!r}" for k in needed)
    msg = (
        f"{where}: these {sel.scheme.name} weights need a model with {_options_text(needed)}, but the model "
        f"has {has}; loading them would compute something else, so nothing was loaded. Build the model with "
        f"create_model(name, {_options_text(_as_options(needed))}, ...), or let backbones.create_pretrained(name, "
        "source) configure it from the checkpoint."
    )
    if sel.scheme.name in ("timm", "torchvision"):
        msg += " If these plain-named weights come from this suite's own model with that geometry, pass format='ours'."
    raise CheckpointError(msg)


def _as_options(geometry: dict) -> dict:
    """Constructor options that give `geometry`: the Caffe pair reads best as style='caffe'."""
    options = dict(geometry)
    if options.get("stride_in_1x1") is True and options.get("stem_pool_ceil") is True:
        del options["stride_in_1x1"], options["stem_pool_ceil"]
        options = {"style": "caffe", **options}
    return options


def _shape_hint(key: str, src: torch.Size, dst: torch.Size) -> str:
    if SE_FC1_WEIGHT.search(key) and src[1:] == dst[1:]:
        if src[0] % 8 == 0 and dst[0] % 8:
            return "The checkpoint rounds its SE width to a multiple of 8 (timm, mmpretrain): set se_divisor=8."
        if dst[0] % 8 == 0 and src[0] % 8:
            return "The checkpoint's SE width is not rounded to a multiple of 8: set se_divisor=1."
        return f"The checkpoint's SE reduction is {src[1] / src[0]:g}: set se_reduction={src[1] / src[0]:g}."
    if key.endswith("downsample.0.weight") and src[2:] != dst[2:]:
        return f"The checkpoint's projection shortcuts are {src[2]}x{src[3]} convs: set downsample_kernel={src[2]}."
    if key.endswith("conv2.weight") and src[0] == dst[0] and src[1] != dst[1]:
        return "The checkpoint's 3x3 convs have another group count: check groups / width_per_group."
    return "Check the model name and its options against the checkpoint's architecture."


def _key_hint(missing: list[str], unexpected: list[str], weights: Iterable[str], model: Iterable[str]) -> str:
    have, want = _depths(weights), _depths(model)
    if have != want:
        return f"The checkpoint has layers={have}, the model layers={want}: check the model name (or set layers)."
    se_keys = [k for k in missing + unexpected if is_se_key(k)]
    if se_keys and len(se_keys) == len(missing) + len(unexpected):
        if all(k.endswith("bias") for k in se_keys):
            return f"The checkpoint's SE layers {'have no' if missing else 'have a'} bias: set se_bias={not missing}."
        if missing and not unexpected:
            return "The checkpoint has no SE blocks: build the plain model (se=False); strict=False keeps SE at init."
        if unexpected and not missing:
            return "The checkpoint has SE blocks: build an SE model (se=True)."
    return "Check the model name and its options (block, se_stages, se_placement) against the checkpoint."


def _depths(keys: Iterable[str]) -> tuple[int, ...]:
    """Blocks per stage in a ResNet state dict: 1 + the largest block index under layer1..layer4."""
    depth = [0, 0, 0, 0]
    for key in keys:
        m = re.match(r"layer([1-4])\.(\d+)\.", key)
        if m:
            stage = int(m[1]) - 1
            depth[stage] = max(depth[stage], int(m[2]) + 1)
    return tuple(depth)


# ------------------------------------------------------------------------------- building the matching model


def create_pretrained(name: str | None, source: Any, **kwargs: Any) -> nn.Module:
    """Build registered model `name` configured as the checkpoint needs, and load it (see `build_pretrained`).

    From the weights: Caffe-style stride and stem pool (Cadene/legacy release), SE bias and SE width rounding
    (se_divisor), number of classes; from our own checkpoints, the recorded architecture (`name=None` takes
    the recorded model name). Explicit model options win, and a conflicting one is refused by the load.
    """
    return build_pretrained(name, source, **kwargs)[0]


def build_pretrained(
    name: str | None,
    source: Any,
    *,
    strict: bool = True,
    map_location: Any = "cpu",
    trusted: bool = False,
    format: str | None = None,
    ema: bool = False,
    prefix: str | None = None,
    **overrides: Any,
) -> tuple[nn.Module, LoadReport, str, dict]:
    """`create_pretrained`, also returning the report, the model name and the options it was built with.

    `strict`, `map_location`, `trusted`, `format`, `ema` and `prefix` are `load_pretrained`'s; `overrides` are
    model options on top of what the checkpoint needs.
    """
    checkpoint = read_checkpoint(source, map_location=map_location, trusted=trusted)
    record = checkpoint.record
    if name is None:
        if not record:
            raise ValueError(f"{checkpoint.path} does not record its architecture: pass the model name")
        name = record["model"]
    options = dict(record["options"]) if record and record.get("model") == name and format is None else {}
    options.update(overrides)
    cls, kwargs = model_config(name, **options)
    probe = meta_model(cls, kwargs)
    sel = select_weights(checkpoint, probe.state_dict(), format=format, ema=ema, prefix=prefix)
    derived = _options_from_weights(name, sel, model_geometry(probe), kwargs)
    options = {**options, **{k: v for k, v in derived.items() if not _overridden(k, overrides)}}
    model = create_model(name, **options)
    report = load_pretrained(model, checkpoint, strict=strict, format=format, ema=ema, prefix=sel.prefix)
    return model, report, name, options


def _overridden(option: str, overrides: Mapping[str, Any]) -> bool:
    """Whether the caller set `option` (setting style decides stride_in_1x1 and stem_pool_ceil too)."""
    return option in overrides or ("style" in overrides and option in _STYLE_OPTIONS)


def _options_from_weights(name: str, sel: Selection, probe_geometry: dict, kwargs: dict) -> dict:
    """Options the model `name` (built with `kwargs`, geometry `probe_geometry`) needs to take these weights."""
    valid = model_options(name)
    needed = {k: v for k, v in sel.geometry.items() if k in probe_geometry and probe_geometry[k] != v}
    options = {k: v for k, v in _as_options(needed).items() if k in valid}
    weights = sel.state_dict
    if has_se(weights) and "se_bias" in valid:
        options["se_bias"] = any(SE_FC1_BIAS.search(k) for k in weights)
    if has_se(weights) and "se_divisor" in valid:
        shapes = [v.shape for k, v in weights.items() if SE_FC1_WEIGHT.search(k)]
        built = {**valid, **kwargs}
        for divisor in (built["se_divisor"], 1, 8):
            if all(se_hidden_channels(s[1], built["se_reduction"], divisor) == s[0] for s in shapes):
                options["se_divisor"] = divisor
                break
    if "num_classes" in valid and f"{CLASSIFIER}weight" in weights:
        options["num_classes"] = weights[f"{CLASSIFIER}weight"].shape[0]
    return {k: v for k, v in options.items() if kwargs.get(k, valid.get(k)) != v}


# ------------------------------------------------------------------------------------------------- helpers


def _options_text(options: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in options.items())


def _classes(head: Mapping[str, torch.Tensor]) -> int:
    weight = head.get(f"{CLASSIFIER}weight")
    return weight.shape[0] if weight is not None else 0


def _few(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "") if items else "none"


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))
