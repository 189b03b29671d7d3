"""What both engines' multi-process runs share: one set of BN running statistics across the processes.

Detectron2 and MMEngine build DDP with `broadcast_buffers=False`, so BN layers that train keep one set of running
statistics per process, each estimated from that process's batches. Rank 0 alone saves checkpoints while every
process evaluates its share of the images: without a common set, the saved model is not the model evaluated.
Each engine's hook (`detection.detectron2.bn_stats.AverageBNStatistics`, the MMDetection runner's
`SyncNormStatisticsHook`) calls `average_norm_statistics` before its saves and evaluations.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def average_norm_statistics(model: nn.Module) -> int:
    """Replace the running mean and variance of `model`'s BN layers in training mode by their mean over the
    processes, in place; -> the number of buffers averaged.

    The mean of the processes' running averages is the running average of all their batches (both are linear in
    the batch statistics), so averaging once before a save or an evaluation gives what averaging at every step
    would. A collective call: every process must make it (the same model and modes everywhere, so all of them
    take the same path). 0, and no communication, with one process or no BN layer in training mode (frozen BN,
    GN, a model in eval mode: the statistics cannot have drifted apart). num_batches_tracked, an integer, is the
    same in every process already.
    """
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return 0
    buffers = [
        b
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
        for b in (m.running_mean, m.running_var)
    ]
    groups: dict[tuple, list[torch.Tensor]] = {}
    for buffer in buffers:  # one all-reduce per dtype and device, in the same order in every process
        groups.setdefault((buffer.dtype, buffer.device), []).append(buffer)
    with torch.no_grad():
        for group in groups.values():
            flat = torch.cat([b.reshape(-1) for b in group])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            for buffer, mean in zip(group, flat.split([b.numel() for b in group]), strict=True):
                buffer.copy_(mean.view_as(buffer))
    return len(buffers)
