"""The benchmark command: presets, options, and the order the sections run in (`tools/benchmark.py`)."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from rich.console import Console

from .models import MODES, Settings, run_models
from .report import Figure, Section, mode_stats, model_figures, print_report, to_json, write_json, write_png
from .timing import CLOCKS, matmul_peak

SECTIONS = ("models", "detection", "data")
# Threading settings that change the figures (OMP_WAIT_POLICY=PASSIVE matters on a shared machine: README)
THREAD_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "MKL_NUM_THREADS")

# Preset sizes; any option given on the command line overrides its preset value.
PRESETS = {
    "default": {"batch_size": 8, "resolution": 224, "repeats": 7, "warmup": 2, "peak_n": 2048, "data_scale": 1.0},
    "quick": {"batch_size": 4, "resolution": 160, "repeats": 3, "warmup": 1, "peak_n": 1536, "data_scale": 0.3},
    # the self-test: one block per stage, a few images; numbers are meaningless, every code path runs
    "tiny": {"batch_size": 2, "resolution": 64, "repeats": 1, "warmup": 0, "peak_n": 128, "data_scale": 0.02},
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmark",
        description="Time our SE-ResNet-50 / ResNet-50 against each other and against timm and torchvision, "
        "interleaved in one process; also detection (Detectron2) and data pipelines. Ratios are times: "
        "below 1 the first is faster.",
    )
    p.add_argument("--quick", action="store_true", help="a small set, about a minute on a 2-core CPU")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # self-test: one block per stage
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    p.add_argument("--dtype", choices=("float32", "bf16"), default="float32", help="bf16 runs under autocast")
    p.add_argument("--batch-size", type=int, help="images per call (default 8, quick 4)")
    p.add_argument("--resolution", type=int, help="square input side (default 224, quick 160)")
    p.add_argument("--channels-last", action="store_true", help="models and inputs in channels_last")
    p.add_argument("--compile", action="store_true", help="torch.compile every model (warm-up absorbs it)")
    p.add_argument("--repeats", type=int, help="timed rounds (default 7, quick 3)")
    p.add_argument("--warmup", type=int, help="untimed rounds first (default 2, quick 1)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: every CPU core)")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time (default), or CPU seconds of this process: on a busy machine, with --threads 1, it "
        "leaves out the time other jobs hold the cores",
    )
    p.add_argument("--modes", default=",".join(MODES), help="comma list of infer,train")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {','.join(SECTIONS)}")
    p.add_argument("--json", type=Path, help="write the figures and every timing here")
    p.add_argument("--png", type=Path, help="write a bar chart of throughputs and ratios here")
    return p


def _comma_list(value: str, allowed: tuple[str, ...], option: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise SystemExit(f"{option}: expected a comma list of {', '.join(allowed)}, got {value!r}")
    return items


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; -> the JSON record (also written to --json)."""
    args = build_parser().parse_args(argv)
    preset_name = "tiny" if args.tiny else "quick" if args.quick else "default"
    preset = PRESETS[preset_name]
    modes = _comma_list(args.modes, MODES, "--modes")
    sections = _comma_list(args.sections, SECTIONS, "--sections")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if device.type == "cuda" and args.clock == "cpu":
        raise SystemExit("--clock cpu measures host CPU time: use the wall clock on CUDA")
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    settings = Settings(
        device=str(device),
        dtype=args.dtype,
        batch_size=args.batch_size or preset["batch_size"],
        resolution=args.resolution or preset["resolution"],
        channels_last=args.channels_last,
        compile=args.compile,
        repeats=args.repeats or preset["repeats"],
        warmup=preset["warmup"] if args.warmup is None else args.warmup,
        threads=threads,
        modes=modes,
        clock=args.clock,
        tiny=args.tiny,
    )
    console = Console(width=None if sys.stdout.isatty() else 150)  # logs keep the table on one line
    log = console.print
    started = time.perf_counter()
    wait = os.environ.get("OMP_WAIT_POLICY")
    header = (
        f"{preset_name} set on {_device_name(device)} ({device}), torch {torch.__version__}, "
        f"{threads} threads, batch {settings.batch_size}, {settings.resolution}x{settings.resolution}, "
        f"{settings.dtype}{', channels_last' if settings.channels_last else ''}"
        f"{', compiled' if settings.compile else ''}{', CPU-time clock' if settings.clock == 'cpu' else ''}"
        f"{f', OMP_WAIT_POLICY={wait}' if wait else ''}"
    )
    log(header)

    mm_dtype = torch.bfloat16 if settings.dtype == "bf16" else torch.float32
    peak_n = preset["peak_n"] * (4 if device.type == "cuda" else 1)
    peak_gflops, peak_time = matmul_peak(device, mm_dtype, n=peak_n, clock=CLOCKS[settings.clock])
    peak = {"gflops": peak_gflops, "matmul_n": peak_n, "dtype": str(mm_dtype), **peak_time.as_dict()}
    log(f"peak: {peak_n}x{peak_n} matmul in {mm_dtype} = {peak_gflops:.1f} GFLOP/s")

    results = run_models(settings, log) if "models" in sections else {}
    figures: list[Figure] = model_figures(results)
    extra: list[Section] = []
    if "detection" in sections:
        from .detection import run_detection

        extra.append(run_detection(settings, log))
    if "data" in sections:
        from .data import run_data

        extra.extend(run_data(settings, preset["data_scale"], log))
    for section in extra:
        figures.extend(section.figures)

    stats = mode_stats(results, settings.batch_size, peak_gflops)
    print_report(console, results, stats, extra, figures, title=f"Models: {header}")
    elapsed = time.perf_counter() - started
    log(f"total {elapsed:.0f} s")
    env = {k: os.environ[k] for k in THREAD_ENV if k in os.environ}
    record = to_json(
        {
            "env": env,
            **asdict(settings),
            "preset": preset_name,
            "torch": torch.__version__,
            "device_name": _device_name(device),
            "seconds": elapsed,
        },
        results,
        stats,
        extra,
        figures,
        peak,
    )
    if args.json:
        write_json(args.json, record)
        log(f"wrote {args.json}")
    if args.png:
        write_png(args.png, results, stats, figures, header)
        log(f"wrote {args.png}")
    return record
