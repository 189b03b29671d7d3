"""Interleaved wall-clock timing, paired ratios, FLOP counting and the matmul peak of a device.

Every candidate runs once per round, in alternating order (A B C, C B A, ...), so slow drift of the machine
(other jobs, thermal limits, frequency scaling) hits all candidates alike and the per-round ratio cancels it.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class Spread:
    """Median and min-max of a sample (seconds, or a ratio)."""

    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        if not values:
            raise ValueError("cannot summarise an empty sample")
        return cls(statistics.median(values), min(values), max(values))

    def as_dict(self) -> dict[str, float]:
        return {"median": self.median, "min": self.min, "max": self.max}


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for the device's queued work (CUDA runs asynchronously; CPU needs nothing)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def interleave(
    fns: Mapping[str, Callable[[], object]],
    *,
    repeats: int,
    warmup: int = 1,
    sync: Callable[[], None] = lambda: None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Run each function `warmup` untimed then `repeats` timed rounds, interleaved; -> seconds per call.

    Round r runs the functions in the given order when r is even and reversed when odd (A B, B A, ...), so
    whatever a neighbour leaves behind (cache contents, allocator state) is shared out evenly. `clock` is wall
    time by default; `time.process_time` (CPU seconds of this process) leaves out the time other jobs hold the
    cores, which keeps single-threaded ratios usable on a busy machine.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            sync()
            start = clock()
            fns[name]()
            sync()
            if r >= warmup:
                times[name].append(clock() - start)
    return times


def paired_ratio(a: list[float], b: list[float]) -> Spread:
    """Per-round time ratios a_i / b_i (same round, so drift cancels), summarised."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    return Spread.of([x / y for x, y in zip(a, b, strict=True)])


def count_flops(model: nn.Module, x: torch.Tensor, *, train: bool) -> int:
    """FLOPs (2 per multiply-add) of convolutions and matmuls for one forward (+ backward when `train`).

    Counted on a copy of the model on the meta device, so it costs no compute and leaves `model` untouched.
    Elementwise work (BN, ReLU, the SE scale) is not counted: the figure is the dense-math work only.
    """
    try:
        meta = copy.deepcopy(model).to("meta")
        x = torch.empty(x.shape, device="meta", dtype=x.dtype)
    except (RuntimeError, NotImplementedError):  # a module that cannot live on meta: count for real
        meta = model
    meta.train(train)
    counter = FlopCounterMode(display=False)
    with counter:
        if train:
            meta(x).float().sum().backward()
        else:
            with torch.no_grad():
                meta(x)
    return counter.get_total_flops()


def matmul_peak(
    device: torch.device,
    dtype: torch.dtype,
    *,
    n: int,
    repeats: int = 5,
    warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[float, Spread]:
    """Achieved GFLOP/s of an (n, n) @ (n, n) matmul in `dtype`: the practical peak of the device.

    Returns (GFLOP/s at the median time, the time spread in seconds).
    """
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    times = interleave(
        {"mm": lambda: torch.mm(a, b)}, repeats=repeats, warmup=warmup, sync=synchronizer(device), clock=clock
    )
    spread = Spread.of(times["mm"])
    return 2 * n**3 / spread.median / 1e9, spread
