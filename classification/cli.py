"""The LightningCLI every classification trainer shares: `run_cli(DataModuleClass)`.

A trainer script is one call (tools/train_cifar.py):

    run_cli(CIFARDataModule)

and gets `fit | validate | test --config recipe.yaml [--config model.yaml] [--data.x ...] [--trainer.x ...]` with
the model section bound to `ClassificationModule` and these defaults on top of Lightning's:
  - `--seed_everything 0`: the one seed, of the model's initialisation and of the data order and augmentation
    (`classification.loaders.data_seed`), so `--ckpt_path last` continues the same order;
  - `--checkpoint.*`: RunCheckpoints in `<trainer.default_root_dir>/checkpoints` (a fixed folder, so
    `--ckpt_path last` finds it from a new process): last.ckpt every epoch, best.ckpt (lowest validation top-1
    error), epochNNN.ckpt every `--checkpoint.every_n_epochs` epochs (default 1), all written atomically
    (AtomicCheckpointIO); a ModelCheckpoint under `trainer.callbacks` gets the same folder (the
    Places365-Challenge and ImageNet configs add one that also writes last.ckpt every N steps, so a pre-empted
    epoch resumes mid-way);
  - `--nan_guard.*`: NonFiniteLossGuard, which stops a diverged run before a checkpoint holds it;
  - `--curves.*`: TrainingCurves, which plots the curves to `<default_root_dir>/curves.png` and prints the
    final error when fit, validate or test ends; BadSampleReport, for data that skips bad images;
  - CSV and TensorBoard loggers under `<default_root_dir>/csv` and `<default_root_dir>/tensorboard` unless
    `--trainer.logger` says otherwise.
`fit` prints the batch per device, the global batch it makes and the lr when it starts, and refuses to run
without a length (trainer.max_epochs or max_steps): the sign of a model config given without its recipe.
Before any data is read, every subcommand checks that its output folders can be written, removes the temporary
files a killed save left there, and checks `--ckpt_path` and `--model.pretrained`; `--ckpt_path last` resumes
the newest complete checkpoint when last.ckpt is missing (a kill between an epoch's files) and says which.
`main` runs the CLI for the tools/ scripts: a wrong path, a bad file, a full disk or a diverged run ends in one
line, not a traceback. Under DDP (`--trainer.strategy ddp --trainer.devices N`, one process per device) the line
names the failing rank, and the other ranks, whose next collective fails with it, stop with a line pointing to it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from backbones import CheckpointError
from backbones.fileio.atomic import remove_stale_temp_files

from .callbacks import NonFiniteLossError, NonFiniteLossGuard, TrainingCurves
from .checkpoints import AtomicCheckpointIO, RunCheckpoints, check_writable, checkpoint_folders, resume_checkpoint
from .imagefolder import BadSampleReport
from .module import ClassificationModule
from .samples import DataError

say = rank_zero_only(print)


def _as_list(value: Any) -> list:
    return [] if value is None else list(value) if isinstance(value, list | tuple) else [value]


def batch_summary(trainer: Trainer, batch_size: int, lr: float) -> str:
    """What one optimizer step sees: the per-device batch, the global batch it makes, and the lr for it."""
    devices, nodes, accumulate = trainer.num_devices, trainer.num_nodes, trainer.accumulate_grad_batches
    total = batch_size * devices * nodes * accumulate
    return (
        f"batch: {batch_size} per device x {devices} device(s) x {nodes} node(s) x {accumulate} accumulated = "
        f"{total} images per optimizer step, at lr {lr:g} ({lr * 256 / total:.4g} per 256 images)"
    )


class ClassificationCLI(LightningCLI):
    """LightningCLI with the suite's checkpoint, logger and callback defaults (see the module docstring)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # a plain class group, not a Lightning callback argument, which would come after the config's own
        # callbacks: the first ModelCheckpoint is trainer.checkpoint_callback (`--ckpt_path best`)
        parser.add_class_arguments(RunCheckpoints, "checkpoint", fail_untyped=False, sub_configs=True)
        parser.add_lightning_class_args(NonFiniteLossGuard, "nan_guard")
        parser.add_lightning_class_args(TrainingCurves, "curves")

    def before_instantiate_classes(self) -> None:
        self.started = time.time()  # temporary files older than this are from a killed earlier run
        # a model config given without its recipe would train for Lightning's default 1000 epochs at a constant lr
        trainer = self.config[self.subcommand].trainer if self.subcommand else self.config.trainer
        if self.subcommand == "fit" and trainer.max_epochs is None and trainer.max_steps == -1:
            self.parser.error(
                "fit needs trainer.max_epochs or trainer.max_steps; a model config comes after its recipe "
                "(--config configs/lightning/<task>/recipe_*.yaml --config <model>.yaml)"
            )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer = config["trainer"]
        root = Path(trainer.get("default_root_dir") or os.getcwd())
        callbacks = [config["checkpoint"], *_as_list(trainer.get("callbacks"))]
        for cb in callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath is None:
                # fixed, unversioned: a later process must find last.ckpt for --ckpt_path last
                cb.dirpath = str(root / "checkpoints")
        defaults: dict[str, Any] = {"callbacks": callbacks}
        if trainer.get("logger") in (None, True):
            defaults["logger"] = [CSVLogger(root, name="csv"), TensorBoardLogger(root, name="tensorboard")]
        plugins = _as_list(trainer.get("plugins"))
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            defaults["plugins"] = [*plugins, AtomicCheckpointIO()]
        # Lightning appends the `--nan_guard` and `--curves` callbacks and those of trainer_defaults
        return super().instantiate_trainer(**{**defaults, **kwargs})

    def before_fit(self) -> None:
        self.prepare_run()
        batch_size = self.datamodule.hparams.get("batch_size")
        if batch_size is not None:
            say(batch_summary(self.trainer, batch_size, self.model.hparams.lr))

    def before_validate(self) -> None:
        self.prepare_run()

    def before_test(self) -> None:
        self.prepare_run()

    def prepare_run(self) -> None:
        """What can fail on a path fails now, in one line, not after the data is read or an epoch is trained."""
        trainer, config, fitting = self.trainer, self.config_init[self.subcommand], self.subcommand == "fit"
        checkpoints = checkpoint_folders(trainer)
        for folder in dict.fromkeys([Path(trainer.default_root_dir), *(checkpoints if fitting else [])]):
            check_writable(folder)
            removed = remove_stale_temp_files(folder, before=self.started)
            if removed:
                say(f"removed {len(removed)} temporary file(s) of an interrupted save: {', '.join(map(str, removed))}")
        config["ckpt_path"] = ckpt_path = self._resolve_ckpt_path(config.get("ckpt_path"), checkpoints, fitting)
        pretrained = self.model.hparams.get("pretrained")
        if ckpt_path is None and pretrained and "://" not in pretrained and not Path(pretrained).is_file():
            raise FileNotFoundError(f"--model.pretrained {pretrained}: no such file")

    def _resolve_ckpt_path(self, ckpt_path: str | None, checkpoints: list[Path], fitting: bool) -> str | None:
        where = ", ".join(map(str, checkpoints))
        if ckpt_path == "last":
            found = resume_checkpoint(checkpoints)
            if found is None and not fitting:
                raise FileNotFoundError(f"--ckpt_path last: no checkpoint in {where}")
            if found is None:
                say(f"--ckpt_path last: no checkpoint in {where} yet; training from the start")
                return None
            note = "" if found.name.startswith("last") else " (the newest complete checkpoint: no last.ckpt)"
            say(f"--ckpt_path last: resuming from {found}{note}")
            return str(found)
        if ckpt_path == "best" and not getattr(self.trainer.checkpoint_callback, "best_model_path", None):
            # a new process: Lightning knows only the best of its own fit; best.ckpt is that of earlier ones
            best = [f / "best.ckpt" for f in checkpoints if (f / "best.ckpt").is_file()]
            if not best:
                raise FileNotFoundError(f"--ckpt_path best: no best.ckpt in {where}")
            return str(best[0])
        if ckpt_path not in (None, "best", "hpc") and "://" not in ckpt_path and not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such file")
        return ckpt_path

    def after_fit(self) -> None:
        """Validate the final weights when training stopped after the last validation (max_steps mid-epoch)."""
        trainer = self.trainer
        curves = next((cb for cb in trainer.callbacks if isinstance(cb, TrainingCurves)), None)
        if curves is not None and 0 <= curves.last_val_step != trainer.global_step:
            say(
                f"training ended at step {trainer.global_step}, after the last validation: validating the final weights"
            )
            trainer.validate(self.model, datamodule=self.datamodule, verbose=False)


def _process() -> tuple[int, int]:
    """(global rank, processes) of this process's DDP run; (0, 1) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _peer_failed(e: RuntimeError) -> bool:
    """A collective that failed because another rank is gone: gloo says its connection closed; NCCL raises a
    DistError (a dead peer shows there as a timeout)."""
    return isinstance(e, dist.DistError) or any(s in str(e) for s in ("closed by peer", "reset by peer"))


def main(datamodule_class: type[LightningDataModule], *user_errors: type[Exception]) -> None:
    """`run_cli(datamodule_class)` for a tools/ script: a wrong path, a bad data or checkpoint file (and
    `user_errors`, the task's own), a full disk or a diverged run end in `error: <message>` and exit status 1.

    Under DDP the rank that failed prints `error (rank R of N): <message>`; the others, stopped by the failed
    collective, print one line that points to it instead of a traceback. Every rank sees a diverged run at
    the same check: rank 0 alone says so.
    """
    try:
        run_cli(datamodule_class)
    except (DataError, CheckpointError, NonFiniteLossError, OSError, *user_errors) as e:
        rank, world = _process()
        if isinstance(e, NonFiniteLossError) and rank > 0:
            sys.exit(1)
        sys.exit(f"error{f' (rank {rank} of {world})' if world > 1 else ''}: {e}")
    except RuntimeError as e:
        rank, world = _process()
        if world == 1 or not _peer_failed(e):
            raise
        first = next(iter(str(e).strip().splitlines()), type(e).__name__)
        sys.exit(
            f"error (rank {rank} of {world}): stopped: another process of this run failed, its error is above ({first})"
        )


def run_cli(
    datamodule_class: type[LightningDataModule],
    args: list[str] | dict[str, Any] | None = None,
    *,
    run: bool = True,
    model_class: type[ClassificationModule] = ClassificationModule,
    trainer_defaults: dict[str, Any] | None = None,
    **kwargs: Any,
) -> ClassificationCLI:
    """Build (and by default run) the classification CLI for `datamodule_class`.

    Args:
        datamodule_class: the task's DataModule (its __init__ arguments become `--data.*`).
        args: command-line arguments (default: sys.argv[1:]); tests pass a list.
        run: False parses and instantiates model, data and trainer without a subcommand (for inspection).
        model_class: ClassificationModule or a subclass (its __init__ arguments become `--model.*`).
        trainer_defaults: as LightningCLI's; its callbacks run besides the CLI's.
        kwargs: forwarded to LightningCLI.
    """
    trainer_defaults = dict(trainer_defaults or {})
    trainer_defaults["callbacks"] = [BadSampleReport(), *_as_list(trainer_defaults.get("callbacks"))]
    return ClassificationCLI(
        model_class,
        datamodule_class,
        args=args,
        run=run,
        trainer_defaults=trainer_defaults,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        **kwargs,
    )
