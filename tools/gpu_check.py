"""GPU readiness, the work of tools/gpu_check.sh: every engine's smoke run and the benchmark on one GPU, in one
JSON and one PNG, in under 8 minutes.

    tools/gpu_check.sh OUT            # the entry point (refuses at once without a GPU)
    python tools/gpu_check.py OUT [--budget SECONDS] [--only NAME,...]

Steps, each a subprocess with its own time limit, cut to what is left of the budget (a step that no longer
fits, or whose engine is not installed, is recorded as skipped with the reason; a failed one with the tail of
its output; the next one runs either way):
  - the CIFAR, Places365 and ImageNet Lightning trainers (the smoke configs; ImageNet: its Section 5.1 recipe
    with SE-ResNet-50 on a generated tree), 2 epochs on the GPU in bf16-mixed and 16-mixed, weights in
    channels_last (`ChannelsLast`); `Throughput` measures the training images/s of the last epoch;
  - the Detectron2 and MMDetection smoke configs on cuda (their COCO AP);
  - tools/benchmark.py --device cuda --dtype bf16 --channels-last, without and with --compile: the SE
    overhead in inference and training, ours vs timm and torchvision.
Writes OUT/gpu_check.json (the GPU, every step's status, wall time, figures) and OUT/gpu_check.png (trainer
images/s and step times); the runs' own outputs stay under OUT/runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 450  # the whole check within 8 minutes, with the start-up and the report around it
PRECISIONS = ("bf16-mixed", "16-mixed")


class ChannelsLast(Callback):
    """Weights in channels_last (NHWC) from the start of the run: cuDNN then keeps the activations in NHWC too,
    the layout its bf16 / fp16 tensor-core kernels read without a transpose.
    `--trainer.callbacks+=tools.gpu_check.ChannelsLast` adds it to any trainer."""

    def setup(self, trainer, pl_module, stage):
        pl_module.to(memory_format=torch.channels_last)  # before the optimizer and DDP see the parameters


class Throughput(Callback):
    """Training images/s per epoch, training steps only (validation is left out), written to `path` (JSON) when
    training ends. The device is synchronised at each start and stop, not per step."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.epochs: list[dict] = []
        self._t0: float | None = None

    def _start(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def _stop(self) -> None:
        if self._t0 is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - self._t0
            self._t0 = None

    def on_train_epoch_start(self, trainer, pl_module):
        self.images, self.seconds = 0, 0.0
        self._start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.images += len(batch[0])

    def on_validation_start(self, trainer, pl_module):
        self._stop()

    def on_validation_end(self, trainer, pl_module):
        if trainer.training and not trainer.sanity_checking:
            self._start()

    def on_train_epoch_end(self, trainer, pl_module):
        self._stop()
        self.epochs.append({"images": self.images, "seconds": self.seconds})

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero and self.epochs:
            last = self.epochs[-1]  # the first epoch holds the warm-up (cuDNN autotuning, allocator)
            record = {"images_per_s": last["images"] / max(last["seconds"], 1e-9), "epochs": self.epochs}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(record, indent=2))


def make_imagenet(root: Path, classes: int = 4, train: int = 128, val: int = 16) -> Path:
    """A small ImageNet-layout tree of 256x256 JPEGs (train/<wnid>/, val/<wnid>/), once."""
    import numpy as np

    from places365.synthetic import class_image, write_jpeg

    if (root / "done").is_file():
        return root
    rng = np.random.default_rng(0)
    for c in range(classes):
        wnid = f"n{c:08d}"
        for split, n in (("train", train), ("val", val)):
            for i in range(n):
                write_jpeg(root / split / wnid / f"{wnid}_{i}.JPEG", class_image(c, classes, 256, rng))
    (root / "done").touch()
    return root


def trainer_steps(out: Path) -> list[dict]:
    """The Lightning trainers' runs, bf16-mixed first for all three (the 16-mixed runs come later)."""
    recipes = {
        "cifar": ("train_cifar", ["--config", "configs/lightning/smoke/cifar10_synthetic.yaml"]),
        "places365": (
            "train_places365",
            ["--config", "configs/lightning/smoke/places365_synthetic.yaml",
             f"--data.root={out / 'data/places365_synthetic'}", "--data.num_workers=8"],
        ),
        "imagenet": (
            "train_imagenet",
            ["--config", "configs/lightning/imagenet/recipe_section5.yaml",
             "--config", "configs/lightning/imagenet/imagenet_se_resnet50.yaml",
             f"--data.root={out / 'data/imagenet'}", "--data.batch_size=64", "--data.num_workers=12"],
        ),
    }  # fmt: skip
    steps = []
    for precision in PRECISIONS:
        for name, (tool, args) in recipes.items():
            run = out / "runs" / f"{name}_{precision}"
            command = [sys.executable, f"tools/{tool}.py", "fit", *args, "--trainer.accelerator=gpu",
                       "--trainer.devices=1", f"--trainer.precision={precision}", "--trainer.max_epochs=2",
                       "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={run}",
                       "--trainer.callbacks+=tools.gpu_check.ChannelsLast",
                       "--trainer.callbacks+=tools.gpu_check.Throughput",
                       f"--trainer.callbacks.init_args.path={run / 'throughput.json'}"]  # fmt: skip
            steps.append({"name": f"{name} {precision}", "command": command, "limit": 90,
                          "result": run / "throughput.json"})  # fmt: skip
    return steps


def all_steps(out: Path) -> list[dict]:
    """Every step, in the order they run: the most telling first, torch.compile (the slowest) last."""
    trainers = trainer_steps(out)
    bench = [sys.executable, "tools/benchmark.py", "--device", "cuda", "--dtype", "bf16", "--channels-last"]
    bench += ["--batch-size", "64", "--sections", "models"]
    detection = [
        {"name": "detectron2 smoke", "limit": 150, "result": out / "runs/detectron2/coco_metrics.json",
         "needs": detectron2_missing,
         "command": [sys.executable, "tools/train_net.py", "--config",
                     "configs/detectron2/smoke/faster_rcnn_se_r50_synthetic.yaml",
                     "MODEL.DEVICE", "cuda", "OUTPUT_DIR", str(out / "runs/detectron2")]},
        {"name": "mmdetection smoke", "limit": 150, "result": out / "runs/mmdet/metrics.json",
         "needs": mmdetection_missing,
         "command": [sys.executable, "tools/train_mmdet.py", "configs/mmdet/smoke/faster-rcnn_se-r50_fpn_synthetic.py",
                     "--work-dir", str(out / "runs/mmdet")]},
    ]  # fmt: skip
    benchmarks = [
        {"name": f"benchmark{suffix}", "limit": limit, "result": out / f"benchmark{suffix.replace(' ', '_')}.json",
         "command": [*bench, *flags, "--json", str(out / f"benchmark{suffix.replace(' ', '_')}.json")]}
        for suffix, flags, limit in (("", [], 120), (" compile", ["--compile"], 240))
    ]  # fmt: skip
    return [*trainers[:3], *detection, benchmarks[0], *trainers[3:], benchmarks[1]]


def summarise(name: str, record: dict) -> dict:
    """The figures worth keeping from a step's own JSON."""
    if name.startswith("benchmark"):
        figures = {k: v for k, v in record.items() if isinstance(v, int | float)}
        models = record.get("models", {})
        speed = {f"{k} {m}": e[m]["images_per_s"] for k, e in models.items() for m in ("infer", "train") if m in e}
        return {"figures": figures, "images_per_s": speed}
    return record


def detectron2_missing() -> str | None:
    """Why the Detectron2 step cannot run in this environment, or None (its install is the README's, by hand)."""
    if importlib.util.find_spec("detectron2") is None:
        return "detectron2 is not installed (README: Detectron2)"
    return None


def mmdetection_missing() -> str | None:
    """Why the MMDetection step cannot run in this environment (no mmdet extra, mmcv without ops), or None."""
    from detection.mmdet.runner import MMDetUnavailable, check_mmdet

    try:
        check_mmdet()
    except MMDetUnavailable as e:
        return str(e)
    return None


def run_step(step: dict, env: dict, deadline: float) -> dict:
    """Run one step within its limit and the time left; -> its record. A step whose engine is not installed is
    recorded as skipped with the reason, at once, rather than failing after its start-up."""
    left = deadline - time.monotonic()
    entry = {"name": step["name"], "command": " ".join(map(str, step["command"]))}
    if left < 20:  # not even a start-up fits
        return {**entry, "status": "skipped (time budget)"}
    missing = step["needs"]() if "needs" in step else None
    if missing:
        print(f"{entry['name']:<24} skipped: {missing}", flush=True)
        return {**entry, "status": "skipped (not installed)", "reason": missing}
    limit = min(step["limit"], left)
    start = time.monotonic()
    try:
        done = subprocess.run(step["command"], cwd=REPO, env=env, capture_output=True, text=True, timeout=limit)
        status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        output = done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        status = f"timeout ({limit:.0f} s)"
        output = "".join(x.decode(errors="replace") for x in (e.stdout, e.stderr) if x)  # bytes, even with text=True
    entry |= {"status": status, "wall_s": round(time.monotonic() - start, 1)}
    result = Path(step["result"])
    if status == "ok" and result.is_file():
        entry["result"] = summarise(step["name"], json.loads(result.read_text()))
    elif status != "ok":
        entry["output_tail"] = output[-3000:]
    print(f"{entry['name']:<24} {status:<22} {entry['wall_s']:>6.1f} s", flush=True)
    return entry


def plot(report: dict, path: Path) -> None:
    """Trainer images/s (left), step wall times coloured by status (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = report["steps"]
    trainers = [s for s in steps if "images_per_s" in s.get("result", {}) and not s["name"].startswith("benchmark")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    left.barh([s["name"] for s in trainers], [s["result"]["images_per_s"] for s in trainers], color="tab:blue")
    left.set(xlabel="training images/s (last epoch)", title=f"trainers on {report['gpu']}")
    colours = ["tab:green" if s["status"] == "ok" else "tab:grey" if s["status"].startswith("skipped") else "tab:red"
               for s in steps]  # fmt: skip
    right.barh([s["name"] for s in steps], [s.get("wall_s", 0) for s in steps], color=colours)
    right.set(xlabel="wall time (s): green ok, red failed, grey skipped", title=f"total {report['wall_s']:.0f} s")
    for ax in (left, right):
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="output folder: gpu_check.json, gpu_check.png, runs/")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help=f"seconds for all steps (default {BUDGET_S})")
    parser.add_argument("--only", help="comma list of step-name prefixes to run (e.g. cifar,benchmark)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA GPU is visible (torch.cuda.is_available() is False): nothing to check", file=sys.stderr)
        return 2
    start, out = time.monotonic(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    steps = all_steps(out)
    if args.only:
        steps = [s for s in steps if s["name"].startswith(tuple(args.only.split(",")))]
    if any(s["name"].startswith("imagenet") for s in steps):
        make_imagenet(out / "data/imagenet")
    # the detection smoke runs generate their synthetic COCO here, not in the checkout's datasets/
    env = {**os.environ, "DETECTRON2_DATASETS": str(out / "data"), "PYTHONWARNINGS": "ignore"}
    deadline = start + args.budget
    report = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "budget_s": args.budget,
        "steps": [run_step(step, env, deadline) for step in steps],
    }
    report["wall_s"] = round(time.monotonic() - start, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, allow_nan=True))
    plot(report, out / "gpu_check.png")
    failed = [s["name"] for s in report["steps"] if s["status"] != "ok"]
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.png'} in {report['wall_s']:.0f} s"
          + (f"; not ok: {', '.join(failed)}" if failed else "; every step ok"))  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # places365.synthetic, from a checkout without installing
    sys.exit(main())
