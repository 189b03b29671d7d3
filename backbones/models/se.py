"""The Squeeze-and-Excitation block: the one implementation every model and engine in this suite uses."""

from __future__ import annotations

import torch
from torch import nn

from .options import GATES, SQUEEZES, SEOptions, check_choice


def se_hidden_channels(channels: int, reduction: float, divisor: int = 1) -> int:
    """Width of the excitation bottleneck: C / r, rounded to a multiple of `divisor` (timm uses 8)."""
    hidden = channels / reduction
    rounded = max(divisor, int(hidden + divisor / 2) // divisor * divisor)
    # never round down by more than 10%, as make_divisible of timm and mmpretrain (timm's own SE modules pass
    # round_limit=0 and skip this step; the two differ only for widths no released model has)
    if rounded < 0.9 * hidden:
        rounded += divisor
    return rounded


class SqueezeExcite(nn.Module):
    """SE: (N, C, H, W) -> (N, C, H, W) = U * gate(fc2(relu(fc1(squeeze(U))))).

    squeeze: "avg" (the paper), "max" (Table 11) or "none" (Table 16, NoSqueeze: the excitation runs as 1x1
    convs at every position). gate: "sigmoid" (the paper), "tanh" or "relu" (Table 12). The two FCs are stored
    as 1x1 convs (weights [C/r, C, 1, 1] and [C, C/r, 1, 1]), the layout of the official weights and of timm.
    """

    def __init__(
        self,
        channels: int,
        reduction: float = 16,
        *,
        squeeze: str = "avg",
        gate: str = "sigmoid",
        bias: bool = True,
        divisor: int = 1,
    ):
        super().__init__()
        self.squeeze = check_choice("squeeze", squeeze, SQUEEZES)
        self.gate_name = check_choice("gate", gate, GATES)
        hidden = se_hidden_channels(channels, reduction, divisor)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=bias)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=bias)

    def extra_repr(self) -> str:
        return f"squeeze={self.squeeze}, gate={self.gate_name}"

    def _gate(self, s: torch.Tensor) -> torch.Tensor:
        if self.gate_name == "sigmoid":
            return s.sigmoid()
        if self.gate_name == "tanh":
            return s.tanh()
        return s.relu()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x * s; with `residual`, residual + x * s in one pass (the SE-ResNet unit's scale and sum)."""
        if self.squeeze == "avg":
            # The mean as sum / (H * W), its own arithmetic (bit-identical in float32), but the backward of a sum is a
            # broadcast view, where the mean's backward writes a gradient as large as x.
            s = x.sum((2, 3), keepdim=True) / (x.shape[2] * x.shape[3])
        elif self.squeeze == "max":
            s = x.amax((2, 3), keepdim=True)
        else:
            s = x
        s = self._gate(self.fc2(self.relu(self.fc1(s))))
        return x * s if residual is None else scale_add(x, s, residual)


def se_block(channels: int, options: SEOptions) -> SqueezeExcite:
    """The SE block `options` describe, for a `channels`-wide feature map."""
    return SqueezeExcite(
        channels,
        options.reduction,
        squeeze=options.squeeze,
        gate=options.gate,
        bias=options.bias,
        divisor=options.divisor,
    )


def scale_add(x: torch.Tensor, scale: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + x * scale, (N, C, H, W), in one pass over memory (x * scale + residual takes two).

    When autograd records none of the three (inference), the result overwrites `x`, as an in-place ReLU or
    torchvision's `out += identity` overwrite their input: `x` must be a tensor the caller owns (the residual
    branch output). No new full-size tensor is then allocated, which keeps the working set in cache
    (tools/benchmark.py: SE-ResNet-50 inference about 5% faster at batch 8 on CPU).
    """
    # two ifs: torch.jit.script skips the block of a bare `if not torch.jit.is_scripting()`, not of an `and`
    if not torch.jit.is_scripting():  # noqa: SIM102
        if not _recording(x):
            tracked = torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad or residual.requires_grad)
            if tracked or not (x.dtype == scale.dtype == residual.dtype):
                return torch.addcmul(residual, x, scale)
            return torch.addcmul(residual, x, scale, out=x)
    # A recorded graph must not hold the `out=` write: the TorchScript-based ONNX exporter's addcmul refuses it,
    # torch.fx and the trace check cannot follow it, and a graph recorded under no_grad would still write when run
    # with grad. Every exporter and compiler understands this form (and fuses it where it can).
    return residual + x * scale


def _recording(x: torch.Tensor) -> bool:
    """Whether this call is being recorded into a graph (jit.trace, torch.compile, torch.export, torch.fx)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or isinstance(x, torch.fx.Proxy)
