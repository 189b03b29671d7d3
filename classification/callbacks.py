"""The callbacks every classification trainer runs (the CLI adds them: `--curves.*`, `--nan_guard.*`).

- `NonFiniteLossGuard` stops a run whose training loss, weights or outputs became NaN or inf before a checkpoint
  or a validation can use the diverged weights;
- `TrainingCurves` plots the per-epoch curves and prints the final error.
"""

from __future__ import annotations

import math
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from backbones.fileio.atomic import atomic_write

from .checkpoints import checkpoint_folders, resume_checkpoint


class NonFiniteLossError(RuntimeError):
    """The training loss, the weights or their outputs became NaN or inf; the run stops before a checkpoint
    holds them."""


_NO_BAD_BATCH = torch.iinfo(torch.int64).max
_PROBE_IMAGES = 4  # of the last training batch, run through the weights about to be saved


def _restart_advice(trainer: Trainer) -> str:
    found = resume_checkpoint(checkpoint_folders(trainer))
    retry = "restart with a lower lr, a longer warm-up or 32-bit precision."
    if found is None:
        return f"No checkpoint was saved before it: {retry}"
    return f"{found} holds the last good save and --ckpt_path last resumes from it; if the run diverges again, {retry}"


class NonFiniteLossGuard(Callback):
    """Raises `NonFiniteLossError` when a training loss is NaN or inf, before any checkpoint or validation holds it,
    and before a save whose weights, or their outputs on the last training images, are not finite.

    Each batch only records its loss on the device: reading it back would make the host wait for the device at
    every step. The record is read back (one all-reduce, so every DDP rank stops at the same batch) every
    `check_every` batches, before each checkpoint save and each validation, and at the end of every epoch.
    A save also checks what no recorded loss has seen, the weights after the last optimizer step: every weight
    and buffer, and the evaluation-mode logits of the last batch's first images (a huge lr leaves finite weights
    whose outputs overflow).

    Args:
        check_every: batches between read-backs.
    """

    def __init__(self, check_every: int = 50):
        self.check_every = check_every
        # during fit: the first non-finite loss since the last check as 2 x index + isinf (_NO_BAD_BATCH if none),
        # and (epoch, batch, global step) of each batch since then, by index
        self._first_bad: torch.Tensor | None = None
        self._unchecked: list[tuple[int, int, int]] = []
        self._probe: torch.Tensor | None = None  # the first images of the last training batch

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._first_bad = torch.full((), _NO_BAD_BATCH, dtype=torch.int64, device=pl_module.device)
        self._unchecked = []
        self._probe = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # the step the batch trains, counted before its optimizer step
        self._unchecked.append((trainer.current_epoch, batch_idx, trainer.global_step))

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None and self._first_bad is not None:
            index = len(self._unchecked) - 1
            code = torch.where(torch.isfinite(loss), _NO_BAD_BATCH, torch.isinf(loss).long() + 2 * index)
            self._first_bad = torch.minimum(self._first_bad, code)
        images = batch[0] if isinstance(batch, list | tuple) else batch
        if isinstance(images, torch.Tensor):
            self._probe = images[:_PROBE_IMAGES].detach().clone()  # a view would keep the whole batch alive
        if len(self._unchecked) >= self.check_every:
            self.check(trainer)

    # ModelCheckpoint saves in these same hooks; Lightning runs it after every other callback
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.check(trainer)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # called while the checkpoint dict is built, before any file is written or an older one deleted
        self.check(trainer)
        self.check_weights(trainer, pl_module)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.check(trainer)  # validation during fit would score a diverged network

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.check(trainer)
        self._first_bad = None

    def check(self, trainer: Trainer) -> None:
        """Read the record back: raise NonFiniteLossError on every rank if any rank saw a non-finite loss."""
        if self._first_bad is None or not self._unchecked:
            return
        # one collective on every rank at the same batch: they stop together, none waits in a later all-reduce
        code = int(trainer.strategy.reduce(self._first_bad.clone(), reduce_op="min"))
        unchecked, self._unchecked = self._unchecked, []
        if code == _NO_BAD_BATCH:
            return
        self._first_bad = None  # this fit is over: a later validate or test checks nothing
        epoch, batch_idx, step = unchecked[code // 2]
        raise NonFiniteLossError(
            f"training loss is {'inf' if code % 2 else 'nan'} at epoch {epoch}, batch {batch_idx} (global step "
            f"{step}; found at step {trainer.global_step}, checks run every {self.check_every} batches and "
            f"before each checkpoint and validation); stopping before any checkpoint holds it. "
            + _restart_advice(trainer)
        )

    def check_weights(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Raise NonFiniteLossError on every rank if a weight or buffer, or the outputs of the weights on the last
        training images (evaluation mode, the training precision), are NaN or inf on any rank."""
        if self._first_bad is None:  # not fitting, or already stopped
            return
        tensors = [t for t in chain(pl_module.parameters(), pl_module.buffers()) if t.is_floating_point()]
        weights_ok = torch.stack([t.isfinite().all() for t in tensors]).all() if tensors else torch.tensor(True)
        outputs_ok = torch.tensor(True)
        if self._probe is not None:
            modes = {m: m.training for m in pl_module.modules()}
            pl_module.eval()
            try:
                with torch.no_grad(), trainer.precision_plugin.forward_context():
                    outputs_ok = pl_module(self._probe).isfinite().all()
            finally:
                for m, training in modes.items():
                    m.training = training
        flags = torch.stack([weights_ok.to(pl_module.device), outputs_ok.to(pl_module.device)]).long()
        weights_ok, outputs_ok = trainer.strategy.reduce(flags, reduce_op="min").tolist()
        if weights_ok and outputs_ok:
            return
        self._first_bad = None
        where = f"after step {trainer.global_step} (epoch {trainer.current_epoch})"
        if weights_ok:
            what = f"the weights {where} are finite but their outputs on the last training images are not (NaN or inf)"
        else:
            named = chain(pl_module.named_parameters(), pl_module.named_buffers())
            bad = next((n for n, t in named if t.is_floating_point() and not t.isfinite().all()), "on another rank")
            what = f"weight {bad} is NaN or inf {where}"
        raise NonFiniteLossError(f"{what}; stopping before a checkpoint holds it. {_restart_advice(trainer)}")


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
            try:
                self.plot(self.path(trainer))
            except Exception as e:  # e.g. the full disk that stopped the run: that error is the one to report
                rank_zero_warn(f"the training curves were not written: {e}")

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
        try:  # all or nothing: a full disk leaves the previous plot, not a 0-byte one
            atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
        finally:
            plt.close(fig)
        return path
