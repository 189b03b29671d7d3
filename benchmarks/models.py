"""Our backbones against each other and against the peers users would pick instead, timed side by side.

Candidates are built at equal architecture: our PyTorch-style SE-ResNet-50 against timm `seresnet50`, our
Caffe-style one (stride in the first 1x1, ceil-mode stem pool) against timm `legacy_seresnet50`, and our
ResNet-50 against torchvision's. Each pair has the same parameter count; `run_models` checks it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from backbones import create_model

from .timing import CLOCKS, count_flops, interleave, synchronizer

MODES = ("infer", "train")
TINY_LAYERS = (1, 1, 1, 1)  # one block per stage: the tool's self-test size


@dataclass(frozen=True)
class Settings:
    """What every model is measured under."""

    device: str = "cpu"
    dtype: str = "float32"  # or "bf16": autocast to bfloat16
    batch_size: int = 8
    resolution: int = 224
    channels_last: bool = False
    compile: bool = False
    repeats: int = 7
    warmup: int = 2
    threads: int = 2
    modes: tuple[str, ...] = MODES
    clock: str = "wall"  # or "cpu": CPU seconds of this process (for a busy machine, with threads=1)
    tiny: bool = False  # one block per stage, for the self-test


@dataclass(frozen=True)
class Candidate:
    key: str
    label: str
    build: Callable[[Sequence[int] | None], nn.Module]  # stage depths (None: the real ResNet-50) -> model
    library: str | None = None  # the peer library the candidate needs, if any


@dataclass(frozen=True)
class Comparison:
    """`key`_infer / `key`_train = time(numerator) / time(denominator); below 1 the numerator is faster."""

    key: str
    numerator: str
    denominator: str
    what: str
    targets: dict[str, float] = field(default_factory=dict)  # mode -> highest acceptable ratio
    same_architecture: bool = True  # the two must have equal parameter counts (peers at equal geometry)


def _ours(name: str, **overrides) -> Callable[[Sequence[int] | None], nn.Module]:
    def build(layers):
        return create_model(name, **overrides, **({"layers": tuple(layers)} if layers else {}))

    return build


def _timm(name: str) -> Callable[[Sequence[int] | None], nn.Module]:
    def build(layers):
        import timm

        return timm.create_model(name, **({"layers": list(layers)} if layers else {}))

    return build


def _torchvision_resnet50(layers):
    from torchvision.models import resnet

    if layers is None:
        return resnet.resnet50()
    return resnet.ResNet(resnet.Bottleneck, list(layers))


CANDIDATES = (
    Candidate("resnet50", "ours resnet50", _ours("resnet50")),
    Candidate("se_resnet50", "ours se_resnet50", _ours("se_resnet50")),
    Candidate("timm_seresnet50", "timm seresnet50", _timm("seresnet50"), "timm"),
    Candidate("torchvision_resnet50", "torchvision resnet50", _torchvision_resnet50, "torchvision"),
    Candidate("se_resnet50_caffe", "ours se_resnet50 caffe", _ours("se_resnet50", style="caffe")),
    Candidate("timm_legacy_seresnet50", "timm legacy_seresnet50", _timm("legacy_seresnet50"), "timm"),
)

COMPARISONS = (
    Comparison(
        "se_overhead",
        "se_resnet50",
        "resnet50",
        "SE cost: ours SE-R50 / ours R50",
        {"infer": 1.02, "train": 1.10},
        False,
    ),
    Comparison(
        "vs_timm", "se_resnet50", "timm_seresnet50", "ours SE-R50 / timm seresnet50", {"infer": 1.0, "train": 1.0}
    ),
    Comparison("vs_timm_legacy", "se_resnet50_caffe", "timm_legacy_seresnet50", "ours SE-R50 caffe / timm legacy"),
    Comparison(
        "vs_torchvision",
        "resnet50",
        "torchvision_resnet50",
        "ours R50 / torchvision resnet50",
        {"infer": 1.0, "train": 1.0},
    ),
)


@dataclass
class ModelResult:
    key: str
    label: str
    params: int
    flops: dict[str, int]  # mode -> FLOPs of one batch (forward, or forward + backward)
    times: dict[str, list[float]] = field(default_factory=dict)  # mode -> seconds per batch, one per round
    same_weights_as: str | None = None  # the candidate whose weights this one runs with, if any


def share_weights(source: nn.Module, target: nn.Module) -> bool:
    """Load `source`'s weights into `target` when their state dicts match by name and shape; -> whether done.

    Peers then compute on the very same numbers: the comparison depends on the code, not on initialisations
    (timm, for one, zero-initialises the last BN of every block, which zeroes the residual branches).
    """
    src, dst = source.state_dict(), target.state_dict()
    if src.keys() != dst.keys() or any(src[k].shape != dst[k].shape for k in src):
        return False
    target.load_state_dict(src)
    return True


def autocast(settings: Settings) -> Callable[[], contextlib.AbstractContextManager]:
    device_type = torch.device(settings.device).type
    if settings.dtype == "bf16":
        return lambda: torch.autocast(device_type, dtype=torch.bfloat16)
    if settings.dtype != "float32":
        raise ValueError(f"dtype must be 'float32' or 'bf16', got {settings.dtype!r}")
    return contextlib.nullcontext


def prepare(model: nn.Module, settings: Settings) -> nn.Module:
    """Move to the device and memory format; -> the module to call (compiled when asked)."""
    model = model.to(settings.device)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if settings.compile else model


def inputs(settings: Settings, num_classes: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch shared by every model: images (N, 3, R, R) and labels (N,)."""
    n, r = settings.batch_size, settings.resolution
    x = torch.randn(n, 3, r, r, device=settings.device)
    if settings.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, num_classes, (n,), device=settings.device)


def infer_step(model: nn.Module, x: torch.Tensor, settings: Settings) -> Callable[[], None]:
    """One eval-mode forward pass without autograd."""
    ctx = autocast(settings)

    def step():
        with torch.inference_mode(), ctx():
            model(x)

    return step


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: Settings) -> Callable[[], None]:
    """One training step: forward, cross-entropy, backward, SGD update (momentum, weight decay)."""
    ctx = autocast(settings)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)

    def step():
        with ctx():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def available_candidates(log: Callable[[str], None] = print) -> list[Candidate]:
    """The candidates whose library is installed (timm and torchvision are dev dependencies)."""
    found = []
    for c in CANDIDATES:
        if c.library is not None:
            try:
                __import__(c.library)
            except ImportError as err:
                log(f"skipping {c.label}: {c.library} is not installed ({err})")
                continue
        found.append(c)
    return found


def run_models(settings: Settings, log: Callable[[str], None] = print) -> dict[str, ModelResult]:
    """Time every available candidate, interleaved, in each mode; -> results by candidate key."""
    layers = TINY_LAYERS if settings.tiny else None
    device = torch.device(settings.device)
    x, y = inputs(settings)
    results: dict[str, ModelResult] = {}
    modules: dict[str, nn.Module] = {}
    for c in available_candidates(log):
        torch.manual_seed(0)
        model = c.build(layers).to(device)
        flops = {mode: count_flops(model, x, train=mode == "train") for mode in settings.modes}
        results[c.key] = ModelResult(c.key, c.label, sum(p.numel() for p in model.parameters()), flops)
        modules[c.key] = model
    for comp in COMPARISONS:
        a, b = results.get(comp.numerator), results.get(comp.denominator)
        if not (comp.same_architecture and a and b):
            continue
        if a.params != b.params:
            log(f"warning: {comp.what} compares unequal models ({a.params:,} vs {b.params:,} parameters)")
        elif share_weights(modules[comp.numerator], modules[comp.denominator]):
            results[comp.denominator].same_weights_as = comp.numerator

    # Prepared (compiled) once for all modes: dynamo guards on train/eval and grad mode, so each mode's
    # warm-up rounds still absorb that mode's compilation.
    runners = {key: prepare(model, settings) for key, model in modules.items()}
    for mode in settings.modes:
        steps = {}
        for key, model in modules.items():
            model.train(mode == "train")
            runner = runners[key]
            steps[key] = infer_step(runner, x, settings) if mode == "infer" else train_step(runner, x, y, settings)
        log(f"timing {mode}: {len(steps)} models x {settings.repeats} rounds (+{settings.warmup} warm-up)")
        times = interleave(
            steps,
            repeats=settings.repeats,
            warmup=settings.warmup,
            sync=synchronizer(device),
            clock=CLOCKS[settings.clock],
        )
        for key, t in times.items():
            results[key].times[mode] = t
        for model in modules.values():  # free gradients before the next mode
            model.zero_grad(set_to_none=True)
    return results
