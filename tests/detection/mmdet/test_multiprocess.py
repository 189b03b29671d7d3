"""tools/train_mmdet.py under torchrun (`--launcher pytorch`) with 2 CPU processes: the processes join on gloo
(MMEngine's own start needs a GPU), train under DDP with their BN statistics averaged before each save and each
validation, and evaluate as one: the same detections and COCO metrics as one process, files written by rank 0."""

import json
import os
import subprocess
import sys

import pytest

from ..compare import assert_same_detections, assert_same_metrics
from .common import REPO, SMOKE, require_mmdet

require_mmdet()

ITERS = 4
TOLERANCE = dict(images=60, score=1e-6, box=1e-3)
TRAIN = [
    f"train_cfg.max_iters={ITERS}",
    f"train_cfg.val_interval={ITERS}",
    f"default_hooks.checkpoint.interval={ITERS}",
]


def train_mmdet(root, processes: int, *args: str, options: tuple[str, ...] = (), status: int = 0) -> str:
    """tools/train_mmdet.py in `processes` processes (torchrun, free port) or one plain process; -> its output."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    argv = [*(launch if processes > 1 else [sys.executable]), str(REPO / "tools/train_mmdet.py"), str(SMOKE), *args]
    argv += ["--launcher", "pytorch" if processes > 1 else "none", *(["--cfg-options", *options] if options else [])]
    env = {**os.environ, "DETECTRON2_DATASETS": str(root / "datasets"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=400)
    output = done.stdout + done.stderr
    assert done.returncode == status, output[-4000:]
    return output


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two processes train 4 iterations from scratch (BN training) and validate; then the saved checkpoint is
    evaluated by one and by two processes. Every evaluation dumps its detections (CocoMetric's outfile_prefix)."""
    root = tmp_path_factory.mktemp("mmdet_multiprocess")
    train_mmdet(
        root, 2, "--work-dir", str(root / "train"), options=(*TRAIN, f"val_evaluator.outfile_prefix={root}/train/dets")
    )
    weights = root / "train" / f"iter_{ITERS}.pth"
    for n in (1, 2):
        out = root / f"eval{n}"
        prefix = f"test_evaluator.outfile_prefix={out}/dets"
        train_mmdet(root, n, "--eval-only", "--checkpoint", str(weights), "--work-dir", str(out), options=(prefix,))
    return root


def detections(folder) -> list[dict]:
    return json.loads((folder / "dets.bbox.json").read_text())


def metrics(folder) -> dict:
    record = json.loads((folder / "metrics.json").read_text())
    assert "coco/bbox_mAP" in record
    return record


def test_two_cpu_processes_train_under_ddp_and_save_once(runs):
    out = runs / "train"
    (log,) = out.glob("*/*.log")  # one run folder, one log: rank 0's
    text = log.read_text()
    assert "Distributed training: True" in text and "GPU number: 2" in text  # MMEngine's words for 2 processes
    assert "MMDistributedDataParallel" in text
    assert sorted(p.name for p in out.glob("*.pth")) == [f"iter_{ITERS}.pth"]
    assert (out / "last_checkpoint").read_text().strip() == str(out / f"iter_{ITERS}.pth")
    assert not list(out.glob(".*.tmp"))
    import torch

    checkpoint = torch.load(out / f"iter_{ITERS}.pth", map_location="cpu", weights_only=False)
    assert checkpoint["meta"]["iter"] == ITERS
    assert "module." not in next(iter(checkpoint["state_dict"]))  # the detector's keys, not DDP's wrapper
    # BN trained (its statistics moved from their initial 0 / 1), so the next test compares something
    assert checkpoint["state_dict"]["backbone.bn1.running_var"].sub(1).abs().max() > 1e-3


def test_eval_with_two_processes_equals_one(runs):
    """The val images are split between the processes; CocoMetric gathers their detections on rank 0."""
    assert_same_detections(detections(runs / "eval1"), detections(runs / "eval2"), **TOLERANCE)
    assert_same_metrics(metrics(runs / "eval1"), metrics(runs / "eval2"))


def test_end_of_training_validation_equals_an_evaluation_of_the_saved_checkpoint(runs):
    """Without averaging the BN statistics, each process validated its share with its own statistics while the
    checkpoint kept rank 0's: the metrics at the end of training were not those of the saved model."""
    assert_same_detections(detections(runs / "eval1"), detections(runs / "train"), **TOLERANCE)
    assert_same_metrics(metrics(runs / "eval1"), metrics(runs / "train"))


def test_a_bad_checkpoint_is_one_line_from_two_processes(runs):
    """Both processes refuse the file before the run starts; the user reads one error, not one per process."""
    (runs / "bad.pth").write_bytes(b"not a checkpoint")
    output = train_mmdet(runs, 2, "--eval-only", "--checkpoint", str(runs / "bad.pth"), status=1)
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: --checkpoint {runs / 'bad.pth'}: not a checkpoint (expected a torch .pth/.pt/.bin/"
                      f".ckpt, safetensors or pickle file); it starts with b'not a ch'"]  # fmt: skip


def test_only_a_gpu_less_torchrun_start_is_taken_over(monkeypatch):
    """On a GPU machine, or without --launcher pytorch, MMEngine starts the processes itself (NCCL, device ids)."""
    import torch
    from mmengine.config import Config

    from detection.mmdet.runner import start_cpu_processes

    cfg = Config.fromfile(str(SMOKE))
    cfg.launcher = "none"
    assert not start_cpu_processes(cfg) and "model_wrapper_cfg" not in cfg
    cfg.launcher = "pytorch"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not start_cpu_processes(cfg) and "model_wrapper_cfg" not in cfg
