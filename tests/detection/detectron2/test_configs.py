"""The Detectron2 add-on's parts that need no Detectron2: config values, backbone contract, weight naming, CLI."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from backbones import create_model, to_detectron2
from backbones.checkpoints.export import DETECTRON2_PREFIX, IMAGENET_PREPROCESSING

REPO = Path(__file__).resolve().parents[3]
CONFIGS = REPO / "configs/detectron2"
LEAVES = ("faster_rcnn_se_r50", "faster_rcnn_r50", "faster_rcnn_se_r101", "faster_rcnn_r101")


def _merge(base: dict, leaf: dict) -> dict:
    out = dict(base)
    for key, value in leaf.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_yaml(path: Path) -> dict:
    """A detectron2 YAML config with its _BASE_ chain resolved, read as plain text (no detectron2 needed)."""
    data = yaml.safe_load(path.read_text())
    base = data.pop("_BASE_", None)
    return _merge(load_yaml(path.parent / base), data) if base else data


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@pytest.mark.parametrize("name", LEAVES)
def test_2x_schedule_and_data(name):
    cfg = load_yaml(CONFIGS / f"{name}.yaml")
    solver = cfg["SOLVER"]
    assert solver["IMS_PER_BATCH"] == 16
    assert solver["BASE_LR"] == 0.02
    assert solver["MAX_ITER"] == 180000
    assert tuple(yaml.safe_load(str(solver["STEPS"]).replace("(", "[").replace(")", "]"))) == (120000, 160000)
    # Detectron's (SOLVER.WARM_UP_*, BIAS_DOUBLE_LR, BIAS_WEIGHT_DECAY defaults), not detectron2's
    assert solver["WARMUP_ITERS"] == 500 and solver["WARMUP_METHOD"] == "linear"
    assert abs(solver["WARMUP_FACTOR"] - 1 / 3) < 1e-9
    assert solver["BIAS_LR_FACTOR"] == 2.0 and solver["WEIGHT_DECAY_BIAS"] == 0.0
    assert solver["MOMENTUM"] == 0.9 and solver["WEIGHT_DECAY"] == 1e-4
    assert "coco_2017_train" in cfg["DATASETS"]["TRAIN"] and "coco_2017_val" in cfg["DATASETS"]["TEST"]
    assert cfg["MODEL"]["BACKBONE"]["NAME"] == "build_se_resnet_fpn_backbone"
    assert cfg["MODEL"]["RESNETS"]["DEPTH"] == (101 if name.endswith("101") else 50)
    assert cfg["MODEL"]["SENET"]["ENABLED"] is name.startswith("faster_rcnn_se_")


@pytest.mark.parametrize("name", LEAVES)
def test_preprocessing_agrees_with_imagenet_weights(name):
    """RGB, ImageNet mean/std in 0-255 units and the stride in the 3x3 conv: what torchvision/timm weights need."""
    model = load_yaml(CONFIGS / f"{name}.yaml")["MODEL"]
    pre = IMAGENET_PREPROCESSING
    assert load_yaml(CONFIGS / f"{name}.yaml")["INPUT"]["FORMAT"] == pre["channel_order"] == "RGB"
    assert model["PIXEL_MEAN"] == pytest.approx([255 * m for m in pre["mean"]], abs=1e-3)
    assert model["PIXEL_STD"] == pytest.approx([255 * s for s in pre["std"]], abs=1e-3)
    assert model["RESNETS"]["STRIDE_IN_1X1"] is False
    se = "se_" if name.startswith("faster_rcnn_se_") else ""
    assert Path(model["WEIGHTS"]).stem == f"{se}resnet{model['RESNETS']['DEPTH']}"


@pytest.mark.parametrize("depth", ["50", "101"])
def test_se_and_plain_rows_differ_only_in_se(depth):
    se = _flat(load_yaml(CONFIGS / f"faster_rcnn_se_r{depth}.yaml"))
    plain = _flat(load_yaml(CONFIGS / f"faster_rcnn_r{depth}.yaml"))
    differ = {k for k in se.keys() | plain.keys() if se.get(k) != plain.get(k)}
    assert differ == {"MODEL.SENET.ENABLED", "MODEL.WEIGHTS", "OUTPUT_DIR"}


def test_smoke_config_uses_own_dataset_names_and_cpu():
    cfg = load_yaml(CONFIGS / "smoke/faster_rcnn_se_r50_synthetic.yaml")
    assert cfg["MODEL"]["DEVICE"] == "cpu" and cfg["MODEL"]["SENET"]["ENABLED"] is True
    names = cfg["DATASETS"]["TRAIN"] + cfg["DATASETS"]["TEST"]
    assert "senet_synthetic_train" in names and "senet_synthetic_val" in names and "coco" not in names
    assert cfg["MODEL"]["ROI_HEADS"]["NUM_CLASSES"] == 4


def test_feature_pyramid_contract_of_our_backbone():
    """What the detectron2 backbone exposes: res2..res5 at strides 4..32 with these channels."""
    model = create_model("se_resnet50", layers=(1, 1, 1, 1), num_classes=0).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = model.forward_features(x)
    assert list(feats) == ["res2", "res3", "res4", "res5"]
    expected = {"res2": (256, 4), "res3": (512, 8), "res4": (1024, 16), "res5": (2048, 32)}
    for info in model.feature_info:
        channels, stride = expected[info["name"]]
        assert (info["channels"], info["stride"]) == (channels, stride)
        assert feats[info["name"]].shape == (2, channels, 64 // stride, 96 // stride)


def test_weights_for_detectron2_are_named_as_the_fpn_bottom_up():
    model = create_model("se_resnet50", layers=(1, 1, 1, 1))
    weights = to_detectron2(model.state_dict())
    assert DETECTRON2_PREFIX == "backbone.bottom_up."
    assert "backbone.bottom_up.conv1.weight" in weights
    assert "backbone.bottom_up.layer1.0.se.fc1.weight" in weights
    assert not any(k.startswith("backbone.bottom_up.fc.") or k.endswith("num_batches_tracked") for k in weights)
    ours = {k for k in model.state_dict() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    assert {k.removeprefix(DETECTRON2_PREFIX) for k in weights} == ours
    assert torch.equal(torch.from_numpy(weights["backbone.bottom_up.conv1.weight"]), model.conv1.weight.detach())


def _python(*lines: str) -> subprocess.CompletedProcess:
    """Run these lines in a fresh interpreter from the repository root."""
    return subprocess.run([sys.executable, "-c", "\n".join(lines)], cwd=REPO, capture_output=True, text=True)


def test_synthetic_dataset_imports_without_detectron2():
    done = _python(
        "import sys; sys.modules['detectron2'] = None; sys.modules['mmdet'] = None",
        "import detection",
        "assert not detection.HAS_DETECTRON2 and detection.make_synthetic_coco and detection.SYNTHETIC_CLASSES",
    )
    assert done.returncode == 0, done.stderr


def test_train_net_without_detectron2_says_how_to_install():
    """One line naming the install command, exit code 2, no traceback."""
    done = _python(
        "import runpy, sys; sys.modules['detectron2'] = None",
        "sys.argv = ['tools/train_net.py', '--config', 'configs/faster_rcnn_se_r50.yaml']",
        "runpy.run_path('tools/train_net.py', run_name='__main__')",
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert "Detectron2" in lines[0] and "pip install --no-build-isolation" in lines[0]
    assert "git+https://github.com/facebookresearch/detectron2.git" in lines[0]
