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
  train/loss_step, train/loss_epoch, train/top1_error (epoch, %, on augmented batches), train/lr (step),
  val/loss, val/top1_error, val/top5_error (%), and the same under test/. Under DDP every epoch value is
  over all ranks' samples; train/loss_step (the progress bar's) is this rank's.
A non-finite training loss is caught by the CLI's `NonFiniteLossGuard` callback (classification.callbacks).
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
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from backbones import UntrustedCheckpointError, create_model, load_pretrained


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
        trusted: let `pretrained` be a pickle that runs code when loaded (refused by default); only for a file
            from a source you trust.
        label_smoothing: cross-entropy label smoothing in [0, 1).
        lr, momentum, nesterov, weight_decay: SGD settings; `no_wd_on_bn_bias` exempts BN parameters and biases
            from weight decay.
        schedule: "multistep" (`milestones`, `gamma`), "cosine" (to `min_lr` at the end of training) or
            "constant". Counts are in units of `interval`: "step" (optimizer steps) or "epoch".
        warmup: length of the warm-up in `interval` units (0 = none); `warmup_mode` "linear" or "constant",
            starting at `warmup_factor` x lr.
    """

    def __init__(
        self,
        model: str | nn.Module = "cifar_resnet110",
        model_options: dict[str, Any] | None = None,
        num_classes: int = 10,
        pretrained: str | None = None,
        trusted: bool = False,
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
        accuracy = {k: MulticlassAccuracy(num_classes, top_k=min(k, num_classes), average="micro") for k in (1, 5)}
        # no compute groups: top-1 and top-5 states can be equal after the first batch, and would then be merged
        metrics = MetricCollection({f"top{k}": m for k, m in accuracy.items()}, compute_groups=False)
        self.metrics = nn.ModuleDict({stage: metrics.clone(prefix=f"{stage}/") for stage in ("val", "test")})
        # the mean of the per-sample losses, reduced over the ranks as the errors are. Lightning's sync_dist mean
        # is not exact when the ranks hold unequal sample counts (its gloo mean truncates the summed count), as
        # evaluation shares are. "disable": no NaN check, which would make the host wait for the device per batch
        self.losses = nn.ModuleDict({stage: MeanMetric(nan_strategy="disable") for stage in ("val", "test")})

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
            try:
                load_pretrained(self.model, self.hparams.pretrained, trusted=self.hparams.get("trusted", False))
            except UntrustedCheckpointError as e:
                # the loader's advice names the flag of the plain tools; here it is a model option
                flag = "--model.trusted true"
                message = str(e)
                raise UntrustedCheckpointError(
                    message.replace("--trusted", flag) if "--trusted" in message else f"{message} ({flag} opens it)"
                ) from e
            self._pretrained_pending = False

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._pretrained_pending = False

    # Lightning restores a checkpoint after `setup` and before these hooks; only strategies that restore after
    # their own setup (FSDP, DeepSpeed) call on_fit_start first: the file is then read, and overwritten
    def on_fit_start(self) -> None:
        self.load_pretrained_weights()

    def on_validation_start(self) -> None:
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

    def loss(self, logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        smoothing = self.hparams.label_smoothing
        return F.cross_entropy(logits.float(), target, label_smoothing=smoothing, reduction=reduction)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, target = batch
        logits = self(images)
        loss, n = self.loss(logits, target), len(target)
        # the step value stays this rank's: syncing it would add an all-reduce to every step; the epoch means
        # (the curves') are reduced over the ranks once, at the epoch's end
        self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=n)
        self.log("train/loss_epoch", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=n)
        error = (logits.argmax(1) != target).float().mean() * 100
        self.log("train/top1_error", error, on_step=False, on_epoch=True, sync_dist=True, batch_size=n)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        images, target = batch
        logits = self(images)
        self.losses[stage].update(self.loss(logits, target, reduction="none"))
        self.metrics[stage].update(logits, target)

    def _log_errors(self, stage: str) -> None:
        # compute() all-reduces the sums and counts across ranks; error in percent as the paper reports it. The
        # values are then the same on every rank: the max of equal numbers is exact (and spares Lightning's
        # warning about epoch values logged without sync_dist)
        values = {f"{stage}/loss": self.losses[stage].compute()}
        values |= {f"{name}_error": (1.0 - accuracy) * 100 for name, accuracy in self.metrics[stage].compute().items()}
        for name, value in values.items():
            self.log(name, value, prog_bar=name.endswith("top1_error"), sync_dist=True, reduce_fx="max")
        self.losses[stage].reset()
        self.metrics[stage].reset()

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
