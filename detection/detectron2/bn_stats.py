"""BatchNorm running statistics averaged across the processes of a DDP run, before each checkpoint and evaluation.

detectron2 builds DDP with `broadcast_buffers=False`, so with trainable BN (MODEL.RESNETS.NORM "BN") each process
updates running_mean / running_var from its own batches only. Without averaging, the evaluation at the end of
training mixes the processes' models (each evaluates its share of the val images with its own statistics) while
model_final.pth holds rank 0's. The averaging itself is `detection.distributed.average_norm_statistics`.
"""

from __future__ import annotations

from detectron2.engine import HookBase
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from detection.distributed import average_norm_statistics


class AverageBNStatistics(HookBase):
    """Averages the BN running statistics across processes (`average_norm_statistics`) in `after_step` at the
    iterations where the hooks after it use them: PeriodicCheckpointer (every `checkpoint_period` iterations, and
    model_final at the last), EvalHook (every `eval_period`, and in after_train once the last iteration is done).
    Insert it before PeriodicCheckpointer and EvalHook, after PreciseBN (which recomputes each process's own)."""

    def __init__(self, model: nn.Module, *, checkpoint_period: int, eval_period: int):
        self._model = model.module if isinstance(model, DistributedDataParallel) else model
        self._periods = [p for p in (checkpoint_period, eval_period) if p > 0]

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if next_iter == self.trainer.max_iter or any(next_iter % p == 0 for p in self._periods):
            average_norm_statistics(self._model)
