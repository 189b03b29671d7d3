"""The image-classification LightningModule shared by the CIFAR, Places365 and ImageNet trainers.

Usage (Python):

    module = ClassificationModule("cifar_se_resnet110", num_classes=10, lr=0.1, milestones=[32000, 48000],
                                  interval="step", warmup=400, warmup_mode="constant", warmup_factor=0.1)
    module = ClassificationModule(my_built_network, num_classes=365)     # any nn.Module: (N, 3, H, W) -> logits

Usage (LightningCLI YAML, `model:` section): the same keyword arguments, e.g.

    model:
      model: cifar_resnet110
      model_options: {depth_per_stage: 1}     # any backbones.create_model override
      num_classes: 10
      lr: 0.1
      milestones: [32000, 48000]
      interval: step

Logged metrics (names are the contract the CLI callbacks and the other trainers rely on):
  train/loss (step and epoch), train/top1_error (epoch, %, on augmented batches), train/lr (step),
  val/loss, val/top1_error, val/top5_error (%), and the same under test/.
A non-finite training loss raises `NonFiniteLossError` before any checkpoint or validation can use it: each
step only records it on the device, and the record is read back (one all-reduce) every `finite_check_every`
batches, before each checkpoint save and validation, and at the end of every epoch.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from backbones import create_model, load_pretrained


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf; the run stops before the bad step reaches a checkpoint."""


_NO_BAD_BATCH = torch.iinfo(torch.int64).max


@dataclass
class LrSchedule:
    """Multiplicative lr factor as a function of the scheduler count t (steps or epochs, from 0).

    Warm-up for t < `warmup`: "constant" keeps `warmup_factor` (He et al.: 0.01 = 0.1 x 0.1 for 400
    iterations, then back to 0.1); "linear" ramps from `warmup_factor` to 1 (Goyal et al.). After warm-up:
    "multistep" multiplies by `gamma` at each milestone (absolute counts, warm-up included); "cosine" decays
    from 1 to `min_factor` between the end of warm-up and `total`; "constant" stays at 1.
    """

    schedule: str = "multistep"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup: int = 0
    warmup_mode: str = "linear"
    warmup_factor: float = 0.1
    total: int = 1
    min_factor: float = 0.0

    def __call__(self, t: int) -> float:
        if t < self.warmup:
            if self.warmup_mode == "constant":
                return self.warmup_factor
            return self.warmup_factor + (1.0 - self.warmup_factor) * t / self.warmup
        if self.schedule == "multistep":
            return self.gamma ** bisect_right(list(self.milestones), t)
        if self.schedule == "cosine":
            span = max(1, self.total - self.warmup)
            progress = min(1.0, (t - self.warmup) / span)
            return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0


def param_groups(model: nn.Module, weight_decay: float, no_wd_on_bn_bias: bool) -> list[dict[str, Any]]:
    """Parameter groups for SGD; with `no_wd_on_bn_bias`, 1-d tensors (BN scales and shifts, biases) get no decay."""
    if not no_wd_on_bn_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class ClassificationModule(LightningModule):
    """Cross-entropy classifier around a backbone: (N, 3, H, W) images -> (N, num_classes) logits.

    Args:
        model: a `backbones` model name (`backbones.list_models()`) or an already built nn.Module.
        model_options: keyword overrides for `backbones.create_model(model, ...)` (e.g. {"depth_per_stage": 1}).
        num_classes: number of classes; passed to `create_model` for a named model. For a built module it only
            sizes the metrics (the module's own classifier must already match).
        pretrained: checkpoint path loaded through `backbones.load_pretrained` (the common loader: strips
            prefixes, drops a classifier of another class count, runs no code) when fit, validate or test
            starts without a checkpoint to restore; a resumed run (`--ckpt_path last`) and
            `load_from_checkpoint` take the weights from their checkpoint and never open this file.
        label_smoothing: cross-entropy label smoothing in [0, 1).
        lr, momentum, nesterov, weight_decay: SGD settings; `no_wd_on_bn_bias` exempts BN parameters and biases
            from weight decay.
        schedule: "multistep" (`milestones`, `gamma`), "cosine" (to `min_lr` at the end of training) or
            "constant". Counts are in units of `interval`: "step" (optimizer steps) or "epoch".
        warmup: length of the warm-up in `interval` units (0 = none); `warmup_mode` "linear" or "constant",
            starting at `warmup_factor` x lr.
    """

    # batches between read-backs of the non-finite-loss record (each waits for the device and all-reduces)
    finite_check_every: int = 50

    def __init__(
        self,
        model: str | nn.Module = "cifar_resnet110",
        model_options: dict[str, Any] | None = None,
        num_classes: int = 10,
        pretrained: str | None = None,
        label_smoothing: float = 0.0,
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 1e-4,
        no_wd_on_bn_bias: bool = False,
        schedule: Literal["multistep", "cosine", "constant"] = "multistep",
        milestones: Sequence[int] = (),
        gamma: float = 0.1,
        min_lr: float = 0.0,
        interval: Literal["step", "epoch"] = "epoch",
        warmup: int = 0,
        warmup_mode: Literal["linear", "constant"] = "linear",
        warmup_factor: float = 0.1,
    ):
        super().__init__()
        built = isinstance(model, nn.Module)
        # a built network is not a hyperparameter: its weights are in the state dict, its class in the code
        self.save_hyperparameters(ignore=["model"] if built else None)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1)")
        if nesterov and momentum <= 0:
            raise ValueError("nesterov=True needs momentum > 0")
        if list(milestones) != sorted(milestones):
            raise ValueError(f"milestones {list(milestones)} must be increasing")
        if built:
            if model_options or pretrained:
                raise ValueError("model_options and pretrained apply to a model name, not to a built nn.Module")
            self.model = model
        else:
            self.model = create_model(model, **{"num_classes": num_classes, **(model_options or {})})
        # not loaded here: load_from_checkpoint and a resumed fit also build the module from these
        # hyperparameters, and the file may be gone by then (the checkpoint's weights replace it anyway)
        self._pretrained_pending = pretrained is not None
        # during fit: the device-side record of the first non-finite loss since the last check (2 x index + isinf,
        # _NO_BAD_BATCH if none), and (epoch, batch, global step) of each batch since then, by index
        self._first_bad: torch.Tensor | None = None
        self._unchecked: list[tuple[int, int, int]] = []
        top5 = min(5, num_classes)
        self.val_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")
        self.test_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.test_top5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")

    def setup(self, stage: str) -> None:
        data_classes = getattr(self.trainer.datamodule, "num_classes", None)
        if isinstance(data_classes, int) and data_classes > self.hparams.num_classes:
            raise ValueError(
                f"the data has {data_classes} classes but the model num_classes={self.hparams.num_classes}; "
                f"set --model.num_classes {data_classes}"
            )

    def load_pretrained_weights(self) -> None:
        """Load the `pretrained` file into the network, once; a restored checkpoint cancels it."""
        if self._pretrained_pending:
            load_pretrained(self.model, self.hparams.pretrained)
            self._pretrained_pending = False

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._pretrained_pending = False

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # called while the checkpoint dict is built, before any file is written
        self._raise_if_nonfinite()

    # Lightning restores a checkpoint after `setup` and before these hooks; only strategies that restore after
    # their own setup (FSDP, DeepSpeed) call on_fit_start first: the file is then read, and overwritten
    def on_fit_start(self) -> None:
        self.load_pretrained_weights()

    def on_validation_start(self) -> None:
        self._raise_if_nonfinite()  # validation during fit would score a diverged network
        self.load_pretrained_weights()

    def on_test_start(self) -> None:
        self.load_pretrained_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> logits (N, C); (N, K, 3, H, W) (K crops, e.g. ten-crop) -> log of the mean softmax (N, C).

        The log mean-softmax is a valid logit: its softmax is the crops' mean softmax, so the loss and the
        top-1/top-5 errors become the multi-crop ones with no other change.
        """
        if x.ndim != 5:
            return self.model(x)
        n, k = x.shape[:2]
        probs = self.model(x.flatten(0, 1)).float().softmax(1).view(n, k, -1).mean(1)
        return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), target, label_smoothing=self.hparams.label_smoothing)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, target = batch
        logits = self(images)
        loss = self.loss(logits, target)
        self._check_finite(loss, batch_idx)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(target))
        error = (logits.argmax(1) != target).float().mean() * 100
        self.log("train/top1_error", error, on_step=False, on_epoch=True, batch_size=len(target))
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def _check_finite(self, loss: torch.Tensor, batch_idx: int) -> None:
        """Record a non-finite loss on the device; reading it back here would stall every step."""
        if self._first_bad is None:
            return  # not fitting (e.g. a training_step called by hand)
        loss = loss.detach()
        code = torch.where(torch.isfinite(loss), _NO_BAD_BATCH, torch.isinf(loss).long() + 2 * len(self._unchecked))
        self._first_bad = torch.minimum(self._first_bad, code)
        self._unchecked.append((self.current_epoch, batch_idx, self.global_step))

    def _raise_if_nonfinite(self) -> None:
        """Read the record back: raise NonFiniteLossError on every rank if any rank saw a non-finite loss."""
        if self._first_bad is None or not self._unchecked:
            return
        # one collective on every rank at the same batch: they stop together, none waits in a later all-reduce
        code = int(self.trainer.strategy.reduce(self._first_bad.clone(), reduce_op="min"))
        unchecked, self._unchecked = self._unchecked, []
        if code == _NO_BAD_BATCH:
            return
        self._first_bad = None  # this fit is over: a later validate or test of the module checks nothing
        epoch, batch_idx, step = unchecked[code // 2]
        raise NonFiniteLossError(
            f"training loss is {'inf' if code % 2 else 'nan'} at epoch {epoch}, batch {batch_idx} (global step "
            f"{step}; found at step {self.global_step}, checks run every {self.finite_check_every} batches and "
            "before each checkpoint and validation); stopping before any checkpoint holds it. last.ckpt still "
            "holds the last good save and resumes with --ckpt_path last; if the loss diverges again, restart "
            "with a lower lr, a longer warm-up or 32-bit precision."
        )

    def on_train_start(self) -> None:
        self._first_bad = torch.full((), _NO_BAD_BATCH, dtype=torch.int64, device=self.device)
        self._unchecked = []

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if len(self._unchecked) >= self.finite_check_every:
            self._raise_if_nonfinite()

    def on_train_epoch_end(self) -> None:
        self._raise_if_nonfinite()

    def on_train_end(self) -> None:
        self._raise_if_nonfinite()
        self._first_bad = None

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        images, target = batch
        logits = self(images)
        self.log(f"{stage}/loss", self.loss(logits, target), sync_dist=True, batch_size=len(target))
        getattr(self, f"{stage}_top1").update(logits, target)
        getattr(self, f"{stage}_top5").update(logits, target)

    def _log_errors(self, stage: str) -> None:
        for k in ("top1", "top5"):
            metric = getattr(self, f"{stage}_{k}")
            # compute() all-reduces the counts across ranks; error in percent as the paper reports it
            self.log(f"{stage}/{k}_error", (1.0 - metric.compute()) * 100, prog_bar=k == "top1")
            metric.reset()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_errors("val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_errors("test")

    def lr_schedule(self) -> LrSchedule:
        """The LrSchedule of these hyperparameters; `total` comes from the trainer (max steps or max epochs)."""
        hp = self.hparams
        total = 1
        if hp.schedule == "cosine":
            # max_epochs is -1 when only max_steps is set: the cosine would end after the first epoch
            if hp.interval == "epoch" and (self.trainer.max_epochs or -1) < 1:
                raise ValueError("schedule=cosine with interval=epoch needs trainer.max_epochs (or interval=step)")
            total = int(self.trainer.estimated_stepping_batches) if hp.interval == "step" else self.trainer.max_epochs
        return LrSchedule(
            schedule=hp.schedule,
            milestones=tuple(hp.milestones),
            gamma=hp.gamma,
            warmup=hp.warmup,
            warmup_mode=hp.warmup_mode,
            warmup_factor=hp.warmup_factor,
            total=total,
            min_factor=hp.min_lr / hp.lr if hp.lr > 0 else 0.0,
        )

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.SGD(
            param_groups(self.model, hp.weight_decay, hp.no_wd_on_bn_bias),
            lr=hp.lr,
            momentum=hp.momentum,
            nesterov=hp.nesterov,
        )
        schedule = self.lr_schedule()

        # a plain function, which LambdaLR leaves out of its state dict: a resumed run follows the schedule
        # of its current config (e.g. a longer max_epochs for cosine), only the step count comes from the ckpt
        def factor(t: int) -> float:
            return schedule(t)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": hp.interval}}
