"""Exporting a model to TorchScript (.pt) or ONNX (.onnx), and checking the written file against PyTorch.

`export_model(model, path)` writes the file atomically only after loading it back (torch.jit.load, or an
onnxruntime session) and running it on a random input: the largest absolute difference from the eager model
must stay within `tolerance` times the largest output magnitude when that is above 1 (a randomly initialised
deep network can output 1e6, where float32 sums differ by more than 1e-4), else `ExportMismatchError` and
nothing is written. ONNX files take any batch size
(the check runs a batch of another size than the export saw); height and width are fixed at export.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .fileio.atomic import atomic_write

FORMATS = {".pt": "TorchScript", ".onnx": "ONNX"}  # output suffix -> format
TORCHSCRIPT_METHODS = ("script", "trace")
ONNX_EXPORTERS = ("dynamo", "torchscript")  # torch.onnx.export(dynamo=True), or its TorchScript-based exporter
EXPORT_BATCH, CHECK_BATCH = 2, 3


class ExportMismatchError(RuntimeError):
    """The exported file computes something else than the model (beyond the tolerance)."""


def export_model(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    input_size: tuple[int, int, int],
    method: str = "script",
    exporter: str = "dynamo",
    opset: int | None = None,
    tolerance: float = 1e-4,
) -> float:
    """Write `model` (set to eval mode) to `path`, .pt (TorchScript by `method`) or .onnx (by `exporter`), for
    (N, *input_size) inputs; -> the max abs difference of the written file's output from the model's."""
    path = Path(path)
    kind = FORMATS.get(path.suffix)
    if kind is None:
        raise ValueError(f"{path}: unknown output suffix; use one of {', '.join(FORMATS)}")
    if method not in TORCHSCRIPT_METHODS or exporter not in ONNX_EXPORTERS:
        raise ValueError(f"method must be one of {TORCHSCRIPT_METHODS}, exporter one of {ONNX_EXPORTERS}")
    model.eval()
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(EXPORT_BATCH, *input_size, generator=generator)
    check = torch.randn(CHECK_BATCH, *input_size, generator=generator)
    with torch.no_grad():
        expected = model(check)
    allowed = tolerance * max(1.0, expected.abs().max().item())
    diff = float("nan")

    def write(tmp: Path) -> None:
        nonlocal diff
        if kind == "ONNX":
            _write_onnx(model, example, tmp, exporter, opset)
            got = _run_onnx(tmp, check)
        else:
            scripted = torch.jit.script(model) if method == "script" else torch.jit.trace(model, example)
            torch.jit.save(scripted, tmp)
            with torch.no_grad():
                got = torch.jit.load(tmp, map_location="cpu")(check)
        diff = (got - expected).abs().max().item()
        if not diff <= allowed:  # NaN fails too
            raise ExportMismatchError(
                f"{path}: the exported {kind} model differs from PyTorch by {diff:.3g} (max abs; allowed "
                f"{allowed:.3g}); not written"
            )

    atomic_write(path, write)
    return diff


def _write_onnx(model: nn.Module, example: torch.Tensor, path: Path, exporter: str, opset: int | None) -> None:
    names = {"input_names": ["input"], "output_names": ["output"], "opset_version": opset}
    if exporter == "dynamo":
        batch = {0: torch.export.Dim("batch")}
        # the weights inside the file: an external data file would keep the temporary name
        torch.onnx.export(
            model, (example,), path, dynamo=True, dynamic_shapes=(batch,), external_data=False, verbose=False, **names
        )
    else:
        axes = {"input": {0: "batch"}, "output": {0: "batch"}}
        torch.onnx.export(model, (example,), path, dynamo=False, dynamic_axes=axes, **names)


def _run_onnx(path: Path, x: torch.Tensor) -> torch.Tensor:
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError("checking an ONNX export needs onnxruntime: pip install onnxruntime") from err
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"input": x.numpy()})
    return torch.from_numpy(out)
