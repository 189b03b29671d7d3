"""Train and evaluate an MMDetection config with MMEngine's Runner: the logic behind tools/train_mmdet.py.

`check_mmdet()` turns a missing or unusable mmcv/mmdet into one sentence saying how to install it;
`load_config()` reads a config and applies the command line; `prepare_data()` generates the synthetic dataset
for configs that ask for it and otherwise checks the COCO files are where the config says; `check_checkpoint()`
reads a `--resume` / `--checkpoint` file as the run will, before the run; `start_cpu_processes()` joins
torchrun's processes on gloo where there is no GPU; `build_runner()` builds the Runner with a hook that writes the
latest metrics to `work_dir/metrics.json`, one that averages BN statistics over the processes, and checkpoint
saves that are all or nothing; `run()` does all of it, after deleting what a run killed mid-save left.

Importing this module needs neither mmcv nor mmdet; every function that does imports them itself.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
import time
from pathlib import Path

INSTALL_HINT = (
    "install the MMDetection extra with `uv sync --extra mmdet` (or `uv run --extra mmdet ...`); in another "
    "environment install torch first, then `pip install --no-build-isolation mmcv==2.1.0 && pip install mmdet==3.3.0`"
)
COCO_LAYOUT = (
    "{root}train2017/, {root}val2017/ and {root}annotations/instances_{{train,val}}2017.json "
    "(the layout Detectron2 uses; the configs read $DETECTRON2_DATASETS/coco/, default ./datasets/coco/)"
)


class MMDetUnavailable(RuntimeError):
    """mmcv / mmdet are missing or unusable; the message says how to install them."""


class DatasetNotFound(FileNotFoundError):
    """A dataset file or folder named by the config is missing; the message names it and the expected layout."""


def check_mmdet() -> None:
    """Raise MMDetUnavailable with one clear sentence unless mmcv (with compiled ops), mmengine and mmdet work."""
    for name in ("mmengine", "mmcv"):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise MMDetUnavailable(f"{name} is not installed ({e}): {INSTALL_HINT}") from None
    import mmcv

    try:
        import mmcv.ops  # noqa: F401  (loads the compiled extension mmcv._ext)
    except (ImportError, OSError) as e:
        raise MMDetUnavailable(
            f"mmcv {mmcv.__version__} has no usable compiled ops ({e}); mmcv-lite or a build without "
            f"MMCV_WITH_OPS cannot run Faster R-CNN: {INSTALL_HINT}"
        ) from None
    try:
        import mmdet  # noqa: F401  (asserts its supported mmcv / mmengine range on import)
    except AssertionError as e:
        raise MMDetUnavailable(f"mmdet refuses this mmcv/mmengine: {e} Then {INSTALL_HINT}") from None
    except ImportError as e:
        raise MMDetUnavailable(f"mmdet is not installed ({e}): {INSTALL_HINT}") from None


def allow_mmengine_checkpoints() -> None:
    """Let torch's weights-only unpickler read the checkpoints MMEngine writes (torch >= 2.6 loads weights-only).

    mmengine 0.10 calls `torch.load(path)` on resume and `load_from` (`--checkpoint`, mmdet's tools/test.py,
    `init_detector`, `DetInferencer`); importing `detection.mmdet.backbone`, as every config of ours does, calls
    this function, and so does `build_runner`. Besides tensors its
    checkpoints hold the message hub's `HistoryBuffer`s (numpy arrays and scalars inside), which weights-only
    loading refuses. Two compatibility shims, both on our side, keep loading code-free rather than switching
    weights-only off (an untrusted pickle must not run code):

    1. `HistoryBuffer.__getstate__` pickles the class's statistics functions (min, max, mean, current) as
       `getattr(HistoryBuffer, name)`; allow-listing `getattr` would open the unpickler to arbitrary calls. We
       pickle the buffer's own state only: its `__setstate__` restores those defaults itself.
    2. Allow-list exactly the classes left: HistoryBuffer and numpy's array / dtype / scalar reconstruction.

    A checkpoint written by another MMEngine program still carries `getattr` and is refused by torch with
    its own message; it loads here after `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`, which only a trusted file deserves.
    """
    import numpy as np
    import torch
    from mmengine.logging import HistoryBuffer

    def getstate(self) -> dict:
        state = dict(self.__dict__)
        state.pop("statistics_methods", None)  # mmengine's own __getstate__ also left it in __dict__
        return state

    HistoryBuffer.__getstate__ = getstate
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    dtype_classes = [type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDGUSV"]
    safe = [HistoryBuffer, np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar, *dtype_classes]
    torch.serialization.add_safe_globals(safe)


def parse_cfg_options(items: list[str]) -> dict:
    """["a.b=1", "c=[1,2]"] -> {"a.b": 1, "c": [1, 2]}, parsed as MMEngine's own `--cfg-options` are."""
    from mmengine.config import DictAction

    namespace = argparse.Namespace()
    DictAction(option_strings=[], dest="options")(None, namespace, list(items))
    return namespace.options


def load_config(
    path: str | os.PathLike,
    *,
    cfg_options: dict | None = None,
    work_dir: str | None = None,
    launcher: str = "none",
    resume: bool | str = False,
    load_from: str | None = None,
    auto_scale_lr: bool = False,
):
    """Read an MMDetection config and apply the command line; returns an `mmengine.Config`.

    work_dir defaults to `output/mmdet/<config name>`. `resume=True` resumes from the latest checkpoint of
    work_dir (MMEngine's `last_checkpoint` pointer, written only after a checkpoint is complete); a path resumes
    from that file. `load_from` loads detector weights for evaluation or fine-tuning.
    """
    from mmengine.config import Config

    path = Path(path)
    cfg = Config.fromfile(str(path))
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    cfg.launcher = launcher
    cfg.work_dir = work_dir or cfg.get("work_dir") or str(Path("output/mmdet") / path.stem)
    if resume:
        cfg.resume = True
        cfg.load_from = None if resume is True else str(resume)
    if load_from:
        cfg.load_from = load_from
    if auto_scale_lr:
        if "auto_scale_lr" not in cfg or "base_batch_size" not in cfg.auto_scale_lr:
            raise ValueError(f"{path} has no auto_scale_lr.base_batch_size, so --auto-scale-lr cannot scale lr")
        cfg.auto_scale_lr.enable = True
    return cfg


def _dataset_paths(dataset: dict) -> list[Path]:
    """The annotation file and image folder an mmdet dataset config points at."""
    root = dataset.get("data_root") or ""
    paths = []
    if dataset.get("ann_file"):
        paths.append(Path(root, dataset["ann_file"]))
    image_dir = (dataset.get("data_prefix") or {}).get("img")
    if image_dir is not None:
        paths.append(Path(root, image_dir))
    return paths


def prepare_data(cfg, *, train: bool = True) -> None:
    """Make the data the run needs exist, or say exactly what is missing.

    A config with a `synthetic_data` dict (the smoke configs) gets `detection.synthetic.make_synthetic_coco(**it)`
    first (a no-op when the files are already complete). Otherwise every annotation file and image folder of the
    dataloaders the run uses (train + val when training, test otherwise) and the evaluators' `ann_file` must
    exist, else DatasetNotFound names them and the COCO layout.
    """
    if cfg.get("synthetic_data"):
        from detection.synthetic import make_synthetic_coco

        make_synthetic_coco(**cfg.synthetic_data)
        return
    loaders = ("train_dataloader", "val_dataloader") if train else ("test_dataloader",)
    evaluators = ("val_evaluator",) if train else ("test_evaluator",)
    paths: list[Path] = []
    for key in loaders:
        if cfg.get(key):
            paths += _dataset_paths(cfg[key]["dataset"])
    for key in evaluators:
        evaluator = cfg.get(key)
        for ev in evaluator if isinstance(evaluator, list) else [evaluator] if evaluator else []:
            if ev.get("ann_file"):
                paths.append(Path(ev["ann_file"]))
    missing = [str(p) for p in dict.fromkeys(paths) if not p.exists()]
    if missing:
        root = cfg.get("data_root", "datasets/coco/")
        raise DatasetNotFound(
            f"dataset files missing: {', '.join(missing)}. COCO 2017 is expected as " + COCO_LAYOUT.format(root=root)
        )


def _metrics_hook():
    """A Hook keeping the latest val/test metrics (`.metrics`) and writing them to `work_dir/metrics.json`."""
    from mmengine.dist import is_main_process
    from mmengine.hooks import Hook

    from backbones.fileio.atomic import atomic_write

    class MetricsHook(Hook):
        priority = "LOWEST"

        def __init__(self) -> None:
            self.metrics: dict[str, float] = {}

        def after_val_epoch(self, runner, metrics: dict | None = None) -> None:
            if not metrics:
                return
            self.metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
            if is_main_process():  # every rank gets the metrics; one writes them, whole file or nothing
                text = json.dumps(self.metrics, indent=2)
                atomic_write(Path(runner.work_dir, "metrics.json"), lambda tmp: tmp.write_text(text))

        after_test_epoch = after_val_epoch

    return MetricsHook()


def check_checkpoint(path: str, option: str) -> None:
    """Raise CheckpointError, one sentence starting with `option`, unless `path` reads as the run will read it.

    MMEngine's own load would end in a raw traceback for a missing file, a truncated one (a copy cut short, a
    save killed by another program) or a pickle that needs code to load (refused: only tensors, numbers and
    MMEngine's message-hub buffers are read, see `allow_mmengine_checkpoints`). URLs and other backends pass.
    """
    from backbones import CheckpointError, read_checkpoint
    from backbones.checkpoints.files import UntrustedCheckpointError

    if "://" in str(path):
        return
    allow_mmengine_checkpoints()
    try:
        read_checkpoint(path)  # weights-only, as mmengine's torch.load with our allow-list
    except CheckpointError as e:
        message = str(e)
        if isinstance(e, UntrustedCheckpointError):  # the loader's hint names an option this tool does not have
            message = message.split(" Pass trusted=True", 1)[0] + (
                " Nothing was loaded; a file you trust (from another MMEngine program) loads after "
                "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1."
            )
        e.args = (f"{option} {message}",)
        raise


def _atomic_checkpoint_saves(runner) -> None:
    """Make `runner.save_checkpoint` (what CheckpointHook calls for iter_N.pth / epoch_N.pth / best_*.pth) write
    through `atomic_write`: into a hidden temporary file next to the checkpoint, renamed into place once whole.
    MMEngine writes in place, so a kill mid-save left a truncated checkpoint under its final name, which
    `--resume` then failed on. Other storage backends (URLs) keep MMEngine's own write."""
    from backbones.fileio.atomic import atomic_write

    save = runner.save_checkpoint

    def save_checkpoint(out_dir: str, filename: str, *args, **kwargs) -> None:
        if "://" in str(out_dir):
            return save(out_dir, filename, *args, **kwargs)
        atomic_write(Path(out_dir, filename), lambda tmp: save(str(tmp.parent), tmp.name, *args, **kwargs))

    runner.save_checkpoint = save_checkpoint


def start_cpu_processes(cfg) -> bool:
    """`--launcher pytorch` (torchrun) on a machine without a GPU: join the processes on gloo here; -> whether it did.

    MMEngine's own start (`init_dist`) calls `torch.cuda.set_device(LOCAL_RANK)`, which fails without a GPU, and
    its DDP wrapper passes `device_ids=[LOCAL_RANK]`, which DDP refuses for a module on the CPU. With the process
    group already up the Runner skips `init_dist`; `model_wrapper_cfg` then builds MMEngine's DDP wrapper as it
    would (`broadcast_buffers=False`, the config's `find_unused_parameters`) but without device ids. On a GPU
    machine nothing changes. The config's backend is replaced by gloo (NCCL needs GPUs), its timeout kept.
    """
    import datetime

    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if cfg.get("launcher") != "pytorch" or torch.cuda.is_available() or dist.is_initialized():
        return False
    if mp.get_start_method(allow_none=True) is None:
        mp.set_start_method("spawn")  # as init_dist does: forked data workers and a process group do not mix
    timeout = cfg.get("env_cfg", {}).get("dist_cfg", {}).get("timeout")
    kwargs = {"timeout": datetime.timedelta(seconds=timeout)} if timeout else {}
    dist.init_process_group(backend="gloo", **kwargs)  # rank, world size and rendezvous from torchrun's env://
    wrapper = dict(type="MMDistributedDataParallel", broadcast_buffers=False)
    wrapper["find_unused_parameters"] = cfg.get("find_unused_parameters", False)
    cfg.model_wrapper_cfg = {**wrapper, **(cfg.get("model_wrapper_cfg") or {}), "device_ids": None}
    return True


def _sync_norm_statistics_hook():
    """A Hook giving every process the BN running statistics averaged over the processes
    (`detection.distributed.average_norm_statistics`) after each training iteration: before CheckpointHook
    (VERY_LOW) saves and before the validation the loop starts after the iteration. Averaging at every
    iteration equals averaging once; it costs one all-reduce of the statistics (about 0.2 MB for SE-ResNet-50),
    nothing with frozen BN (the COCO configs) or one process."""
    from mmengine.hooks import Hook
    from mmengine.model import is_model_wrapper

    from detection.distributed import average_norm_statistics

    class SyncNormStatisticsHook(Hook):
        priority = "ABOVE_NORMAL"

        def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
            average_norm_statistics(runner.model.module if is_model_wrapper(runner.model) else runner.model)

    return SyncNormStatisticsHook()


def build_runner(cfg):
    """`Runner.from_cfg(cfg)` (or the config's `runner_type`) with the metrics hook, BN statistics averaged over
    the processes of a multi-process run, and atomic checkpoint saves; returns (runner, metrics hook)."""
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    allow_mmengine_checkpoints()
    start_cpu_processes(cfg)
    runner = RUNNERS.build(cfg) if "runner_type" in cfg else Runner.from_cfg(cfg)
    _atomic_checkpoint_saves(runner)
    metrics = _metrics_hook()
    for hook in (metrics, _sync_norm_statistics_hook()):
        runner.register_hook(hook, priority=hook.priority)
    return runner, metrics


def run(cfg, *, eval_only: bool = False) -> dict[str, float]:
    """Train (validating as the config says) or only evaluate; returns the latest COCO metrics.

    Rank 0 first deletes the temporary files a run killed mid-save (kill -9, OOM killer) left in work_dir:
    hidden `.<name>.<hex>.tmp` files older than this run, a whole checkpoint's size each."""
    start = time.time()
    prepare_data(cfg, train=not eval_only)
    runner, metrics = build_runner(cfg)
    if runner.rank == 0:
        from backbones.fileio.atomic import remove_stale_temp_files

        for path in remove_stale_temp_files(runner.work_dir, before=start):
            runner.logger.info(f"Removed {path}, left by a run killed while saving")
        repaired = repair_last_checkpoint(runner.work_dir)
        if repaired:
            runner.logger.warning(f"last_checkpoint was cut short by a killed run: it now names {repaired}")
    if eval_only:
        runner.test()
    else:
        runner.train()
    return metrics.metrics


def repair_last_checkpoint(work_dir: str | os.PathLike) -> Path | None:
    """Point `work_dir/last_checkpoint` at the newest checkpoint when it names none; returns that checkpoint.

    MMEngine's CheckpointHook rewrites the pointer in place after every save: a kill at that moment leaves it
    empty, and `--resume` would then fail. The checkpoints themselves are whole (`_atomic_checkpoint_saves`)."""
    pointer = Path(work_dir, "last_checkpoint")
    named = pointer.read_text().strip() if pointer.is_file() else None
    if named is None or (named and Path(named).is_file()):  # no run yet, or a pointer that names a checkpoint
        return None
    numbered = [
        (int(m[2]), p) for p in pointer.parent.glob("*.pth") if (m := re.fullmatch(r"(iter|epoch)_(\d+)\.pth", p.name))
    ]
    if not numbered:
        return None
    newest = max(numbered)[1]
    from backbones.fileio.atomic import atomic_write

    atomic_write(pointer, lambda tmp: tmp.write_text(str(newest)))
    return newest


def main_guard(fn, *args, **kwargs):
    """Run fn; unusable mmcv/mmdet, missing data or unloadable weights end the program with one clear line.

    Weights errors are the common loader's `CheckpointError`s (file, key, shapes, the option to set), raised
    when the Runner initialises the backbone, exactly as `backbones.load_pretrained` words them. Under torchrun
    every process of a machine meets the same error in the same files: the machine's first process (LOCAL_RANK
    0) prints it, the others exit with the same status in silence.
    """
    from backbones.checkpoints.loader import CheckpointError

    try:
        return fn(*args, **kwargs)
    except (MMDetUnavailable, DatasetNotFound, CheckpointError) as e:
        if os.environ.get("LOCAL_RANK", "0") != "0":
            sys.exit(1)
        sys.exit(f"error: {e}")
