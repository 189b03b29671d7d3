"""The one ImageNet checkpoint loader: any peer project's weights into our models, all or nothing.

`load_pretrained(model, source)` reads a file (`checkpoint_files`: torch .pth/.pt/.bin/.ckpt, safetensors,
our safetensors + JSON checkpoint, our detectron2 .pkl) or an in-memory state dict, finds the weights inside
whatever wraps them (Lightning `state_dict` + attribute prefix, DDP `module.`, torch.compile `_orig_mod.`, EMA
copies), maps the key scheme onto our names (`checkpoint_formats`), checks the geometry no shape shows
(Caffe-style stride and stem pool, SE function), validates every shape, and only then copies the weights in.
On any error the model is untouched, and an error that one option would fix (`OptionMismatchError`) names it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .files import Checkpoint, CheckpointError, read_checkpoint
from .formats import (
    SE_FC1_WEIGHT,
    KeyScheme,
    detect_scheme,
    get_scheme,
    is_se_key,
    map_state_dict,
    source_geometry,
    unsupported,
)

log = logging.getLogger(__name__)

CLASSIFIER = "fc."
_EMA_PART = re.compile(r"(^|_)ema(_|$)", re.IGNORECASE)


class OptionMismatchError(CheckpointError):
    """Weights that need the model built with other options. `options` maps each flat option name (`se_reduction`,
    `stride_in_1x1`, as `create_model` takes them) to the value the weights need, so that every engine can name
    its own config key for it (detectron2's MODEL.SENET.REDUCTION) without reading the message."""

    def __init__(self, message: str, options: Mapping[str, Any]):
        super().__init__(message)
        self.options = dict(options)


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
    """What a model computes that its weight shapes do not show, from the architecture it records (`arch`):
    stride position, stem pool and SE function, as flat options (`se_squeeze`...)."""
    arch = getattr(model, "arch", {})
    geometry: dict = {}
    if "stem_pool_ceil" in arch:
        geometry["stem_pool_ceil"] = bool(arch["stem_pool_ceil"])
    if "stride_in_1x1" in arch and arch["block"] == "bottleneck":
        geometry["stride_in_1x1"] = bool(arch["stride_in_1x1"])
    se = arch.get("se")
    if se is not None:
        geometry.update(se_squeeze=se.squeeze, se_gate=se.gate)
        if "stem_pool_ceil" in arch:  # the ImageNet networks; the CIFAR ones have one placement
            geometry["se_placement"] = se.placement
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
    allow_nonfinite: bool = False,
) -> LoadReport:
    """Load `source` (path, URL, state dict or `Checkpoint`) into `model`, all or nothing, and report it.

    format: force a key scheme (`checkpoint_formats.SCHEMES`) instead of detecting it; "ours" also means
        "these plain-named weights come from this suite's model: trust the model's geometry".
    ema: load the EMA copy (`state_dict_ema`, `model_ema`, ...) instead of the raw weights.
    prefix: take the weights under this flattened key prefix ("teacher" or "teacher.") when several candidates tie.
    allow_nonfinite: load tensors holding NaN or inf (refused by default: a diverged run's weights fail far
        away, under another name, e.g. as a loss that diverges at once).
    strict: refuse missing or unexpected keys (the classifier follows its own rule: it is loaded when its
        class count matches the model's and dropped, with a note in the report, otherwise).
    Raises `CheckpointError` naming the file (and key and both shapes) on any problem; the model is then unchanged.
    """
    model = _unwrap_model(model)
    checkpoint = read_checkpoint(source, map_location=map_location, trusted=trusted)
    sel = select_weights(checkpoint, model.state_dict(), format=format, ema=ema, prefix=prefix)
    return load_selection(model, checkpoint, sel, strict=strict, allow_nonfinite=allow_nonfinite)


def load_selection(
    model: nn.Module, checkpoint: Checkpoint, sel: Selection, *, strict: bool = True, allow_nonfinite: bool = False
) -> LoadReport:
    """`load_pretrained` with the weights already chosen (`select_weights`) in `checkpoint`."""
    model = _unwrap_model(model)
    current = model.state_dict()
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
        hints = [_shape_hint(k, weights[k].shape, current[k].shape) for k in mismatched]
        raise _mismatch(
            f"{where}: {len(mismatched)} tensor(s) do not fit the model; nothing was loaded.\n"
            + "\n".join(lines[:10] + (["  ..."] if len(lines) > 10 else []) + _unique(h for h, _ in hints)),
            hints,
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
        hint, options = _key_hint(report.missing, report.unexpected, weights, current)
        raise _mismatch(
            f"{where}: the {sel.scheme.name} weights do not match the model's keys; nothing was loaded.\n"
            f"  missing from the checkpoint ({len(report.missing)}): {_few(report.missing, 8)}\n"
            f"  not in the model ({len(report.unexpected)}): {_few(report.unexpected, 8)}\n"
            + hint
            + "\n(strict=False loads the keys that match and reports the rest)",
            [(hint, options)],
        )
    if not file_head:  # no head in the file: the model's keeps its init
        report.missing += [k for k in current if _is_head(k)]
    report.loaded = [k for k in weights if k in current]
    if not allow_nonfinite:
        _check_finite(where, {k: weights[k] for k in report.loaded})
    # keys and shapes are checked and dtype / device conversions done up front: this copy cannot stop half-way
    staged = _as_model_tensors(where, {k: weights[k] for k in report.loaded}, current)
    model.load_state_dict({**current, **staged})
    problems = report.missing or report.unexpected or report.classifier_dropped
    log.log(logging.WARNING if problems else logging.INFO, report.summary())
    return report


def _check_finite(where: str, weights: Mapping[str, torch.Tensor]) -> None:
    # meta tensors hold no values (the conversion to the model's tensors refuses them afterwards)
    bad = [k for k, v in weights.items() if v.is_floating_point() and not v.is_meta and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(
            f"{where}: {len(bad)} tensor(s) hold NaN or inf, the first {bad[0]}; nothing was loaded (saved by a "
            "diverged run?). allow_nonfinite=True (--allow-nonfinite) loads them anyway."
        )


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
        f"create_model(name, {_options_text(as_options(needed))}, ...), or let backbones.create_pretrained(name, "
        "source) configure it from the checkpoint."
    )
    if sel.scheme.name in ("timm", "torchvision"):
        msg += " If these plain-named weights come from this suite's own model with that geometry, pass format='ours'."
    raise OptionMismatchError(msg, needed)


def as_options(geometry: dict) -> dict:
    """Constructor options that give `geometry`: the Caffe pair reads best as style='caffe'."""
    options = dict(geometry)
    if options.get("stride_in_1x1") is True and options.get("stem_pool_ceil") is True:
        del options["stride_in_1x1"], options["stem_pool_ceil"]
        options = {"style": "caffe", **options}
    return options


# A hint: (the sentence for the message, {flat option name: the value the checkpoint needs} when one is known)
Hint = tuple[str, dict]


def _mismatch(message: str, hints: Iterable[Hint]) -> CheckpointError:
    """OptionMismatchError when the hints name options to change, else a plain CheckpointError."""
    options = {k: v for _, opts in hints for k, v in opts.items()}
    return OptionMismatchError(message, options) if options else CheckpointError(message)


def _shape_hint(key: str, src: torch.Size, dst: torch.Size) -> Hint:
    if SE_FC1_WEIGHT.search(key) and src[1:] == dst[1:]:
        if src[0] % 8 == 0 and dst[0] % 8:
            return "The checkpoint rounds its SE width to a multiple of 8 (timm, mmpretrain): set se_divisor=8.", {
                "se_divisor": 8
            }
        if dst[0] % 8 == 0 and src[0] % 8:
            return "The checkpoint's SE width is not rounded to a multiple of 8: set se_divisor=1.", {"se_divisor": 1}
        r = src[1] / src[0]
        return f"The checkpoint's SE reduction is {r:g}: set se_reduction={r:g}.", {"se_reduction": r}
    if key.endswith("downsample.0.weight") and src[2:] != dst[2:]:
        k = src[2]
        return f"The checkpoint's projection shortcuts are {k}x{k} convs: set downsample_kernel={k}.", {
            "downsample_kernel": k
        }
    if key.endswith("conv2.weight") and src[0] == dst[0] and src[1] != dst[1]:
        return "The checkpoint's 3x3 convs have another group count: check groups / width_per_group.", {}
    return "Check the model name and its options against the checkpoint's architecture.", {}


def _key_hint(missing: list[str], unexpected: list[str], weights: Iterable[str], model: Iterable[str]) -> Hint:
    have, want = _depths(weights), _depths(model)
    if have != want:
        return (
            f"The checkpoint has layers={have}, the model layers={want}: check the model name (or set layers).",
            {"layers": have},
        )
    se_keys = [k for k in missing + unexpected if is_se_key(k)]
    if se_keys and len(se_keys) == len(missing) + len(unexpected):
        if all(k.endswith("bias") for k in se_keys):
            bias = not missing
            return f"The checkpoint's SE layers {'have a' if bias else 'have no'} bias: set se_bias={bias}.", {
                "se_bias": bias
            }
        if missing and not unexpected:
            return (
                "The checkpoint has no SE blocks: build the plain model (se=False); strict=False keeps SE at init.",
                {"se": False},
            )
        if unexpected and not missing:
            return "The checkpoint has SE blocks: build an SE model (se=True).", {"se": True}
    return "Check the model name and its options (block, se_stages, se_placement) against the checkpoint.", {}


def _depths(keys: Iterable[str]) -> tuple[int, ...]:
    """Blocks per stage in a ResNet state dict: 1 + the largest block index under layer1..layer4."""
    depth = [0, 0, 0, 0]
    for key in keys:
        m = re.match(r"layer([1-4])\.(\d+)\.", key)
        if m:
            stage = int(m[1]) - 1
            depth[stage] = max(depth[stage], int(m[2]) + 1)
    return tuple(depth)


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
