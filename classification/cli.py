"""The LightningCLI every classification trainer shares: `run_cli(DataModuleClass)`.

A trainer script is two lines (tools/train_cifar.py):

    from classification.cli import run_cli
    run_cli(CIFARDataModule)

and gets `fit | validate | test --config file.yaml [--config more.yaml] [--data.x ...] [--trainer.x ...]` with
the model section bound to `ClassificationModule` and these defaults on top of Lightning's:
  - `--checkpoint.*`: ModelCheckpoint(save_last=True, every epoch) in `<trainer.default_root_dir>/checkpoints`
    (a fixed folder, so `--ckpt_path last` finds it from a new process), written atomically (AtomicCheckpointIO);
    a ModelCheckpoint under `trainer.callbacks` gets the same folder (the Places365-Challenge and ImageNet
    configs add one that also writes last.ckpt every N steps, so a pre-empted epoch resumes mid-way);
  - CSV and TensorBoard loggers under `<default_root_dir>/csv` and `<default_root_dir>/tensorboard` unless
    `--trainer.logger` says otherwise;
  - `--curves.*`: TrainingCurves, which plots the curves to `<default_root_dir>/curves.png` and prints the
    final error when fit, validate or test ends.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO

from backbones.atomic import atomic_write

from .module import ClassificationModule


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose saves are all-or-nothing: a crash mid-save leaves the previous file intact.

    Through `backbones.atomic` (a flushed temporary file in the destination folder, then a rename). Lightning's
    own save streams into the destination (or through a temp file that may sit on another disk).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


class TrainingCurves(Callback):
    """Records per-epoch metrics, plots them to a PNG and prints the final error.

    The history lives in the callback's state dict, so it is checkpointed: after `--ckpt_path last` the plot
    still covers the whole run, not only the resumed part.

    Args:
        filename: PNG path; relative paths are under the trainer's default_root_dir.
    """

    TRAIN_KEYS = ("train/loss_epoch", "train/top1_error")
    VAL_KEYS = ("val/loss", "val/top1_error", "val/top5_error")

    def __init__(self, filename: str = "curves.png"):
        self.filename = filename
        self.history: dict[str, list[tuple[int, float]]] = {}  # metric -> [(epoch, value)]
        self.last_val_step = -1  # global step of the last recorded validation

    def state_dict(self) -> dict[str, Any]:
        history = {k: [list(p) for p in v] for k, v in self.history.items()}
        return {"history": history, "last_val_step": self.last_val_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {k: [(int(e), float(x)) for e, x in v] for k, v in state_dict["history"].items()}
        self.last_val_step = int(state_dict.get("last_val_step", -1))

    def _record(self, trainer: Trainer, keys: tuple[str, ...]) -> None:
        for key in keys:
            value = trainer.callback_metrics.get(key)
            if value is not None:
                self.history.setdefault(key, []).append((trainer.current_epoch, float(value)))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._record(trainer, self.TRAIN_KEYS)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._print_errors(trainer, "validation")
        elif not trainer.sanity_checking:
            self._record(trainer, self.VAL_KEYS)
            self.last_val_step = trainer.global_step

    def path(self, trainer: Trainer) -> Path:
        return Path(trainer.default_root_dir) / self.filename

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        png = self.plot(self.path(trainer))
        last = {k: v[-1][1] for k, v in self.history.items() if v}
        if "val/top1_error" in last and self.last_val_step == trainer.global_step:
            print(
                f"final validation error after {trainer.current_epoch} epochs ({trainer.global_step} steps): "
                f"top-1 {last['val/top1_error']:.2f}%, top-5 {last['val/top5_error']:.2f}%"
            )
        if png is not None:
            print(f"training curves: {png}")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if trainer.is_global_zero:
            self.plot(self.path(trainer))

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._print_errors(trainer, "test")

    def _print_errors(self, trainer: Trainer, stage: str) -> None:
        key = "val" if stage == "validation" else stage
        metrics = trainer.callback_metrics
        if trainer.is_global_zero and f"{key}/top1_error" in metrics:
            print(
                f"{stage} error: top-1 {float(metrics[f'{key}/top1_error']):.2f}%, "
                f"top-5 {float(metrics[f'{key}/top5_error']):.2f}%"
            )

    def plot(self, path: Path) -> Path | None:
        """Loss (left) and error (right) per epoch -> PNG at `path`; None when nothing was recorded."""
        if not self.history:
            return None
        import matplotlib

        matplotlib.use("Agg")  # no display on training machines
        import matplotlib.pyplot as plt

        fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(11, 4))
        for key, ax in [("train/loss_epoch", ax_loss), ("val/loss", ax_loss)] + [
            (k, ax_err) for k in ("train/top1_error", "val/top1_error", "val/top5_error")
        ]:
            points = [(e + 1, x) for e, x in self.history.get(key, []) if math.isfinite(x)]
            if points:
                ax.plot(*zip(*points, strict=True), marker=".", label=key.replace("_epoch", ""))
        ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
        ax_err.set(xlabel="epoch", ylabel="error (%)", title="error")
        for ax in (ax_loss, ax_err):
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


class ClassificationCLI(LightningCLI):
    """LightningCLI with the suite's checkpoint, logger and curve defaults (see the module docstring)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.every_n_epochs": 1,
                "checkpoint.filename": "epoch{epoch:03d}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(TrainingCurves, "curves")

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        root = Path(config.get("default_root_dir") or os.getcwd())
        configured = config.get("callbacks") or []
        # `--checkpoint` first, so it stays trainer.checkpoint_callback (`--ckpt_path best`) beside a config's own
        # ModelCheckpoint (e.g. a step-based last.ckpt)
        callbacks = [*callbacks, *(configured if isinstance(configured, list | tuple) else [configured])]
        config["callbacks"] = []
        for cb in callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath is None:
                # fixed, unversioned: a later process must find last.ckpt for --ckpt_path last
                cb.dirpath = str(root / "checkpoints")
        if config.get("logger") in (None, True):
            config["logger"] = [CSVLogger(root, name="csv"), TensorBoardLogger(root, name="tensorboard")]
        plugins = config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list | tuple) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        config["plugins"] = plugins
        return super()._instantiate_trainer(config, callbacks)

    def after_fit(self) -> None:
        """Validate the final weights when training stopped after the last validation (max_steps mid-epoch)."""
        trainer = self.trainer
        curves = next((cb for cb in trainer.callbacks if isinstance(cb, TrainingCurves)), None)
        if curves is not None and 0 <= curves.last_val_step != trainer.global_step:
            print(
                f"training ended at step {trainer.global_step}, after the last validation: validating the final weights"
            )
            trainer.validate(self.model, datamodule=self.datamodule, verbose=False)


def run_cli(
    datamodule_class: type[LightningDataModule],
    args: list[str] | dict[str, Any] | None = None,
    *,
    run: bool = True,
    model_class: type[ClassificationModule] = ClassificationModule,
    **kwargs: Any,
) -> ClassificationCLI:
    """Build (and by default run) the classification CLI for `datamodule_class`.

    Args:
        datamodule_class: the task's LightningDataModule (its __init__ arguments become `--data.*`).
        args: command-line arguments (default: sys.argv[1:]); tests pass a list.
        run: False parses and instantiates model, data and trainer without a subcommand (for inspection).
        model_class: ClassificationModule or a subclass (its __init__ arguments become `--model.*`).
        kwargs: forwarded to LightningCLI (e.g. trainer_defaults).
    """
    return ClassificationCLI(
        model_class,
        datamodule_class,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        **kwargs,
    )
