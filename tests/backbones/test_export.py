"""Our models through the tools users already run: torch.jit (trace with its check, script), ONNX (both
exporters, run by onnxruntime), torch.export, torch.fx / torchvision's feature extractor, and tools/export.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import backbones as B
from backbones.exporters import ExportMismatchError, export_model
from backbones.models.se import SqueezeExcite

ort = pytest.importorskip("onnxruntime")  # dev dependency, as onnx and onnxscript (the dynamo exporter)

TOOL = Path(__file__).resolve().parents[2] / "tools" / "export.py"
TINY = {"se_resnet50": {"layers": (1, 1, 1, 1)}, "cifar_se_resnet110": {"depth_per_stage": 1}}


def _tiny(name: str, **kw) -> nn.Module:
    small = {"depth_per_stage": 1} if name.startswith("cifar_") else {"layers": (1, 1, 1, 1)}
    return B.create_model(name, num_classes=7, **small, **kw).eval()


def _input(name: str, batch: int = 2) -> torch.Tensor:
    side = 32 if name.startswith("cifar_") else 64
    return torch.randn(batch, 3, side, side)


def _assert_same_features(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value)


# ---- TorchScript ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["se_resnet50", *(n for n in B.list_models() if n != "se_resnet50")])
def test_every_model_scripts_and_traces_with_the_default_check(name, one_thread):
    """se_resnet50 first: torch.jit caches compiled types, so the SE model must compile in a fresh process."""
    model, x, other = _tiny(name), _input(name), _input(name, batch=3)
    scripted = torch.jit.script(model)
    traced = torch.jit.trace(model, x)  # check_trace on: re-traces and compares with the Python model
    features = torch.jit.trace_module(model, {"forward_features": x}, strict=False)  # a dict: strict=False
    with torch.no_grad():
        for compiled in (scripted, traced):
            torch.testing.assert_close(compiled(x), model(x))
            torch.testing.assert_close(compiled(other), model(other))  # the batch is not baked in
        _assert_same_features(scripted.forward_features(x), model.forward_features(x))
        _assert_same_features(features.forward_features(other), model.forward_features(other))


@pytest.mark.parametrize("placement", ["pre", "post", "identity", "3x3"])
def test_other_se_placements_script_and_trace(placement, one_thread):
    model, x = _tiny("se_resnet50", se_placement=placement, se_squeeze="max", se_gate="tanh"), _input("se_resnet50")
    scripted, traced = torch.jit.script(model), torch.jit.trace(model, x)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))
        torch.testing.assert_close(traced(x), model(x))


def test_traced_under_no_grad_then_trained(one_thread):
    """The eager in-place SE sum must not be recorded: the graph runs again with autograd on."""
    model, x = _tiny("se_resnet50"), _input("se_resnet50")
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
    x_traced, x_eager = x.clone().requires_grad_(), x.clone().requires_grad_()
    traced(x_traced).square().sum().backward()
    assert all(p.grad is not None for p in traced.parameters())
    model(x_eager).square().sum().backward()
    torch.testing.assert_close(x_traced.grad, x_eager.grad)


def test_eager_inference_keeps_the_in_place_sum():
    """What the exporters get instead must not cost eager inference its fused, in-place scale-and-sum."""
    se = SqueezeExcite(16).eval()
    x, residual = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    expected = residual + se(x)  # se(x) = x * s
    with torch.no_grad():
        out = se(x, residual)
    assert out.data_ptr() == x.data_ptr()
    torch.testing.assert_close(out, expected)


# ---- ONNX ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("name", TINY)
def test_onnx_export_runs_in_onnxruntime_like_pytorch(name, exporter, tmp_path, one_thread):
    model = _tiny(name)
    path = tmp_path / f"{name}.onnx"
    export_model(model, path, input_size=tuple(_input(name).shape[1:]), exporter=exporter)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 4):  # the batch axis is dynamic
        x = _input(name, batch)
        (out,) = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            assert (torch.from_numpy(out) - model(x)).abs().max() < 1e-4


# ---- torch.export, torch.fx ---------------------------------------------------------------------------------


def test_torch_export_with_a_dynamic_batch(one_thread):
    model, x = _tiny("se_resnet50"), _input("se_resnet50")
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    other = _input("se_resnet50", batch=3)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(other), model(other))


def test_torchvision_feature_extractor(one_thread):
    from torchvision.models.feature_extraction import create_feature_extractor

    model, x = _tiny("se_resnet50"), _input("se_resnet50")
    extractor = create_feature_extractor(model, {"layer2": "res3", "layer4": "res5", "fc": "logits"})
    with torch.no_grad():
        got, features = extractor(x), model.forward_features(x)
        torch.testing.assert_close(got["res3"], features["res3"])
        torch.testing.assert_close(got["res5"], features["res5"])
        torch.testing.assert_close(got["logits"], model(x))


# ---- backbones.exporters and tools/export.py ----------------------------------------------------------------


class _Noisy(nn.Module):
    """Never the same output twice: its export cannot match it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.rand_like(x)


@pytest.mark.parametrize("suffix", [".pt", ".onnx"])
def test_an_export_that_differs_is_refused_and_not_written(suffix, tmp_path):
    path = tmp_path / f"noisy{suffix}"
    path.write_bytes(b"previous")
    with pytest.raises(ExportMismatchError, match=re.escape(f"{path}: the exported ")):
        export_model(_Noisy(), path, input_size=(1, 4, 4), exporter="torchscript")
    assert path.read_bytes() == b"previous" and list(tmp_path.iterdir()) == [path]


def _run_tool(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models, a shared machine
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=300, env=env)


def test_export_tool_end_to_end(tmp_path):
    onnx_file, ts_file = tmp_path / "se.onnx", tmp_path / "cifar.pt"
    done = _run_tool("se_resnet50", str(onnx_file), "--set", "layers=[1,1,1,1]", "--input-size", "64", "64",
                     "--exporter", "torchscript")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "max abs difference from PyTorch" in done.stdout and onnx_file.is_file()
    done = _run_tool("cifar_se_resnet110", str(ts_file), "--set", "depth_per_stage=1", "--method", "trace")
    assert done.returncode == 0, done.stderr
    model = B.create_model("cifar_se_resnet110", depth_per_stage=1)  # same architecture, other weights
    assert torch.jit.load(ts_file).state_dict().keys() == model.state_dict().keys()


def test_export_tool_reads_a_checkpoint(tmp_path):
    model = B.create_model("se_resnet50", layers=(1, 1, 1, 1), num_classes=5).eval()
    B.save_checkpoint(model, tmp_path / "tiny.safetensors")
    out = tmp_path / "tiny.pt"
    done = _run_tool("--checkpoint", str(tmp_path / "tiny.safetensors"), str(out), "--input-size", "64", "64")
    assert done.returncode == 0, done.stderr
    x = _input("se_resnet50")
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(out)(x), model(x))


def test_export_tool_reports_a_mismatch_in_one_line(tmp_path, monkeypatch, capsys):
    from tools import export as tool

    def mismatch(model, path, **kwargs):
        raise ExportMismatchError(f"{path}: the exported ONNX model differs from PyTorch by 1 (max abs; ...)")

    monkeypatch.setattr(tool, "export_model", mismatch)
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["se_resnet50", str(tmp_path / "m.onnx"), "--set", "layers=[1,1,1,1]"])
    message = str(exit_info.value.code)
    assert message.startswith(f"error: {tmp_path / 'm.onnx'}: ") and "\n" not in message
