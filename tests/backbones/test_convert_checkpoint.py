"""tools/convert_checkpoint.py: Cadene weights -> ours -> detectron2, each step computing what the source did."""

from __future__ import annotations

import importlib.util
import json
import pickle
import socket
from pathlib import Path

import pytest
import timm  # dev dependency: builds the Cadene-layout reference model (timm legacy_seresnet50)
import torch

from backbones import create_model, create_pretrained, load_pretrained

TOOL = Path(__file__).resolve().parents[2] / "tools" / "convert_checkpoint.py"
TINY = (1, 1, 1, 1)


def load_tool():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cadene_file(tmp_path_factory):
    """A Cadene / timm legacy SE-ResNet-50 (one block per stage) with random BN statistics, as its .pth."""
    ref = timm.create_model("legacy_seresnet50", layers=list(TINY)).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in ref.state_dict().items():
            if name.endswith(("running_mean", "running_var")):
                t.copy_(torch.rand(t.shape, generator=gen) + (0.5 if name.endswith("var") else -0.5))
    path = tmp_path_factory.mktemp("cadene") / "se_resnet50-cadene.pth"
    torch.save(ref.state_dict(), path)
    return ref, path


def test_cadene_to_ours_to_detectron2_round_trip(cadene_file, tmp_path, capsys):
    ref, src = cadene_file
    tool = load_tool()
    ours = tmp_path / "se_resnet50.safetensors"
    assert tool.main([str(src), str(ours), "--arch", "se_resnet50", "--set", "layers=(1,1,1,1)"]) == 0
    assert "(120 tensors, cadene names)" in capsys.readouterr().out
    record = json.loads(ours.with_suffix(".json").read_text())
    assert record["options"]["style"] == "caffe" and record["geometry"]["stride_in_1x1"] is True
    assert record["source"]["format"] == "cadene" and record["num_classes"] == 1000

    x = torch.randn(1, 3, 40, 40)
    rebuilt = create_pretrained(None, ours).eval()
    with torch.no_grad():
        assert (rebuilt(x) - ref(x)).abs().max() < 1e-5

    d2 = tmp_path / "se_resnet50_d2.pkl"
    assert tool.main([str(ours), str(d2), "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25"]) == 0
    with open(d2, "rb") as f:
        payload = pickle.load(f, encoding="latin1")
    assert payload["__senet__"]["pixel_mean"] == [127.5] * 3 and payload["__senet__"]["pixel_std"] == [63.75] * 3
    assert payload["__senet__"]["stride_in_1x1"] is True and "backbone.bottom_up.fc.weight" not in payload["model"]
    features = create_model("se_resnet50", layers=TINY, style="caffe", num_classes=0).eval()
    assert load_pretrained(features, d2).file_format == "detectron2"
    with torch.no_grad():
        want, got = rebuilt.forward_features(x), features.forward_features(x)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_cli_errors_are_one_clear_line(cadene_file, tmp_path, capsys):
    _, src = cadene_file
    tool = load_tool()
    assert tool.main([str(src), str(tmp_path / "x.safetensors")]) == 2  # a foreign file records no arch
    assert "pass the model name" in capsys.readouterr().err
    assert tool.main([str(src), str(tmp_path / "x.pth"), "--arch", "se_resnet50", "--set", "layers=(1,1,1,1)"]) == 2
    assert ".safetensors" in capsys.readouterr().err
    assert tool.main([str(src), str(tmp_path / "x.safetensors"), "--arch", "se_resnet50"]) == 2
    assert "layers=(1, 1, 1, 1), the model layers=(3, 4, 6, 3)" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written on failure

    class Exploit:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    torch.save({"conv1.weight": torch.zeros(1), "x": Exploit()}, tmp_path / "evil.pth")
    assert tool.main([str(tmp_path / "evil.pth"), str(tmp_path / "y.safetensors"), "--arch", "resnet18"]) == 2
    assert "--trusted" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()


def test_cli_io_errors_are_one_clear_line(cadene_file, tmp_path, capsys, monkeypatch):
    """An unwritable destination and a failed download end in one line and exit code 2, not a traceback."""
    _, src = cadene_file
    tool = load_tool()
    (tmp_path / "file").touch()  # a folder that is a file: refused even to root
    dst = tmp_path / "file" / "x.safetensors"
    assert tool.main([str(src), str(dst), "--arch", "se_resnet50", "--set", "layers=(1,1,1,1)"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(tmp_path / "file") in err

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    with socket.socket() as s:  # a local port nobody listens on: the download fails at once
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/se_resnet50.pth"
    assert tool.main([url, str(tmp_path / "y.safetensors"), "--arch", "se_resnet50"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {url}: download") and err.count("\n") == 1


def test_set_parses_literals_and_strings():
    tool = load_tool()
    args = tool.parse_args(["a", "b", "--set", "layers=(1,1,1,1)", "--set", "style=caffe", "--set", "se_bias=False"])
    assert dict(args.options) == {"layers": (1, 1, 1, 1), "style": "caffe", "se_bias": False}


@pytest.mark.parametrize(
    ("dst", "to", "expected"),
    [("y.pth", None, "the ours format writes .safetensors"), ("y.pkl", "ours", "the ours format writes .safetensors"),
     ("y.safetensors", "detectron2", "the detectron2 format writes .pkl")],
)  # fmt: skip
def test_destination_suffix_is_checked_before_reading_the_source(tmp_path, capsys, dst, to, expected):
    """A DST that the output format would not write is refused at once, before the (slow) load of SRC."""
    tool = load_tool()
    argv = [str(tmp_path / "missing.pth"), str(tmp_path / dst), "--arch", "se_resnet50"] + (["--to", to] if to else [])
    assert tool.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / dst}: {expected}") and err.count("\n") == 1


def test_converter_refuses_nonfinite_weights(tmp_path, capsys):
    """Issue 14, item 1: exit 2 and one line naming the file; nothing written; --allow-nonfinite converts."""
    weights = create_model("se_resnet50", layers=TINY).state_dict()
    weights["fc.bias"][3] = float("nan")
    torch.save(weights, tmp_path / "nan.pth")
    src, dst = str(tmp_path / "nan.pth"), str(tmp_path / "out.safetensors")
    args = [src, dst, "--arch", "se_resnet50", "--set", "layers=(1,1,1,1)"]
    tool = load_tool()
    assert tool.main(args) == 2
    assert "nan.pth: 1 tensor(s) hold NaN or inf, the first fc.bias" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()
    assert tool.main([*args, "--allow-nonfinite"]) == 0
