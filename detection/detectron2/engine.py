"""Training and evaluation with detectron2's DefaultTrainer; `tools/train_net.py` is the command line over it."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

import detectron2.engine.defaults as d2_defaults
import detectron2.utils.comm as comm
from detectron2.config import CfgNode, get_cfg
from detectron2.engine import DefaultTrainer, default_setup, hooks
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling import build_model
from torch import nn

from backbones.fileio.atomic import atomic_write, remove_stale_temp_files

from .bn_stats import AverageBNStatistics
from .checkpoint import SENetCheckpointer, check_weights_file
from .config import add_senet_config
from .data import prepare_datasets

METRICS_FILE = "coco_metrics.json"

log = logging.getLogger(__name__)


def get_config(config_file: str | os.PathLike, opts: Sequence[str] = ()) -> CfgNode:
    """detectron2 defaults + MODEL.SENET, then the YAML file, then `KEY VALUE` overrides."""
    cfg = get_cfg()
    add_senet_config(cfg)
    cfg.merge_from_file(str(config_file))
    cfg.merge_from_list(list(opts))
    return cfg


def build_model_from_config(
    config_file: str | os.PathLike, opts: Sequence[str] = (), *, device: str = "cpu", load_weights: bool = False
) -> nn.Module:
    """The detector a config describes, in eval mode, e.g. for timing SE-R50-FPN against R50-FPN inference.

    The model takes detectron2 inputs: [{"image": (3, H, W) uint8/float tensor in INPUT.FORMAT, "height": H,
    "width": W}] -> [{"instances": Instances}]. `load_weights` loads MODEL.WEIGHTS (random init otherwise).
    """
    cfg = get_config(config_file, [*opts, "MODEL.DEVICE", device])
    model = build_model(cfg)
    if load_weights and cfg.MODEL.WEIGHTS:
        SENetCheckpointer(model, allow_partial=cfg.MODEL.ALLOW_PARTIAL_WEIGHTS).load(cfg.MODEL.WEIGHTS)
    return model.eval()


class Trainer(DefaultTrainer):
    """DefaultTrainer with COCO evaluation (pycocotools) and `SENetCheckpointer` for MODEL.WEIGHTS, resume, saves;
    in several processes, a CPU model (MODEL.DEVICE cpu, gloo) trains under DDP too (`create_ddp_model`), and the
    BN running statistics are averaged across them before each checkpoint and evaluation (`AverageBNStatistics`)."""

    def __init__(self, cfg: CfgNode):
        with _cpu_aware_ddp():
            super().__init__(cfg)

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None) -> COCOEvaluator:
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, output_dir=output_folder)

    @classmethod
    def test(cls, cfg: CfgNode, model: nn.Module, evaluators=None) -> dict:
        results = super().test(cfg, model, evaluators)
        if comm.is_main_process():
            write_metrics(cfg, results)
        return results

    def build_hooks(self) -> list:
        # DefaultTrainer.__init__ makes its DetectionCheckpointer just before it builds the hooks; ours takes its
        # place there, so the periodic saves (atomic) and resume_or_load (a resumed run's last checkpoint, else
        # MODEL.WEIGHTS, which may be an ImageNet checkpoint of ours) go through the one SENetCheckpointer.
        self.checkpointer = SENetCheckpointer(
            self.model,
            self.cfg.OUTPUT_DIR,
            allow_partial=self.cfg.MODEL.ALLOW_PARTIAL_WEIGHTS,
            trainer=weakref.proxy(self),
        )
        # DefaultTrainer's hooks: ..., PreciseBN, PeriodicCheckpointer (rank 0 only), EvalHook, writers. The BN
        # statistics are averaged after PreciseBN and before the first hook that saves or evaluates the model.
        ret = super().build_hooks()
        first_user = next(i for i, h in enumerate(ret) if isinstance(h, hooks.PeriodicCheckpointer | hooks.EvalHook))
        ret.insert(
            first_user,
            AverageBNStatistics(
                self.model, checkpoint_period=self.cfg.SOLVER.CHECKPOINT_PERIOD, eval_period=self.cfg.TEST.EVAL_PERIOD
            ),
        )
        return ret


def create_ddp_model(model: nn.Module, **kwargs) -> nn.Module:
    """detectron2's `create_ddp_model`, which passes device_ids=[local rank] unless told otherwise; DDP refuses
    device_ids for a module on the CPU, so there it passes none."""
    if "device_ids" not in kwargs and all(p.device.type == "cpu" for p in model.parameters()):
        kwargs["device_ids"] = None
    return _d2_create_ddp_model(model, **kwargs)


_d2_create_ddp_model = d2_defaults.create_ddp_model


@contextlib.contextmanager
def _cpu_aware_ddp():
    """DefaultTrainer.__init__ calls create_ddp_model by its module's name, with no way to pass device_ids."""
    d2_defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = _d2_create_ddp_model


def write_metrics(cfg: CfgNode, results: dict) -> Path:
    """COCO metrics {dataset: {"bbox": {"AP", "AP50", "AP75", "APs", "APm", "APl", "AP-<class>"...}}} as strict
    JSON: an AP COCOeval cannot compute (no objects of that size or class: NaN) is null, which every parser reads
    (a bare NaN is not JSON)."""
    if len(cfg.DATASETS.TEST) == 1 and cfg.DATASETS.TEST[0] not in results:
        results = {cfg.DATASETS.TEST[0]: results}  # DefaultTrainer.test unwraps a single dataset's results
    text = json.dumps(_finite_or_null(results), indent=2, allow_nan=False) + "\n"
    return atomic_write(Path(cfg.OUTPUT_DIR) / METRICS_FILE, lambda tmp: tmp.write_text(text))


def _finite_or_null(obj):
    """`obj` with every NaN / infinite float, however nested, replaced by None."""
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite_or_null(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def check(args) -> CfgNode:
    """Config from the command line (`--config-file`, trailing KEY VALUE), with the files it needs checked.

    Generates the synthetic data it names; raises DatasetLayoutError for missing COCO files and CheckpointError
    for a missing or unreadable MODEL.WEIGHTS (unless --resume finds a checkpoint in OUTPUT_DIR, which then is
    what loads). tools/train_net.py calls it before starting workers too: an error raised in a spawned worker
    reaches the user as a wall of tracebacks, and the workers then do not generate the same data at once.
    """
    cfg = get_config(args.config_file, args.opts)
    cfg.freeze()
    prepare_datasets(cfg)
    resuming = args.resume and SENetCheckpointer(nn.Module(), cfg.OUTPUT_DIR).has_checkpoint()  # reads save_dir only
    if not resuming:
        check_weights_file(cfg.MODEL.WEIGHTS)
    return cfg


def setup(args) -> CfgNode:
    """The checked config (`check`), then detectron2's logging, OUTPUT_DIR and seeding (`default_setup`)."""
    cfg = check(args)
    default_setup(cfg, args)
    return cfg


def main(args) -> dict | None:
    """Train (resuming with --resume) and evaluate, or evaluate only (--eval-only); one process per GPU.

    First, rank 0 deletes the temporary files a run killed mid-save (kill -9, OOM killer) left in OUTPUT_DIR:
    hidden `.<name>.<hex>.tmp` files of earlier runs only, whole checkpoints' size each."""
    start = time.time()
    cfg = setup(args)
    if comm.is_main_process():
        for path in remove_stale_temp_files(cfg.OUTPUT_DIR, before=start):
            log.info("Removed %s, left by a run killed while saving", path)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        checkpointer = SENetCheckpointer(model, cfg.OUTPUT_DIR, allow_partial=cfg.MODEL.ALLOW_PARTIAL_WEIGHTS)
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()
