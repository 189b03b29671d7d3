"""The Detectron2 add-on with Detectron2 installed: builders, configs, freezing, weights in every format, training."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("detectron2", reason="Detectron2 is not installed (it cannot be pip-installed on a fresh machine)")

import detectron2.checkpoint.detection_checkpoint as d2_checkpoint  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.engine import default_argument_parser  # noqa: E402
from detectron2.engine.hooks import EvalHook, PeriodicCheckpointer, PreciseBN  # noqa: E402
from detectron2.layers import FrozenBatchNorm2d  # noqa: E402
from detectron2.modeling import build_backbone, build_model  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402
from torch import nn  # noqa: E402

import detection  # noqa: E402
from backbones import (  # noqa: E402
    Bottleneck,
    CheckpointError,
    OptionMismatchError,
    SEOptions,
    SqueezeExcite,
    create_model,
    save_checkpoint,
    save_detectron2,
)
from detection.detectron2 import SENetCheckpointer, get_config  # noqa: E402
from detection.detectron2 import data as d2data  # noqa: E402
from detection.detectron2.backbone import SEResNet  # noqa: E402
from detection.detectron2.bn_stats import AverageBNStatistics  # noqa: E402
from detection.detectron2.checkpoint import config_hint  # noqa: E402
from detection.detectron2.data import DatasetLayoutError, prepare_datasets  # noqa: E402
from detection.detectron2.engine import METRICS_FILE, Trainer, check  # noqa: E402
from detection.detectron2.engine import main as train_net_main  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
CONFIGS = REPO / "configs/detectron2"
LEAVES = ("faster_rcnn_se_r50", "faster_rcnn_r50", "faster_rcnn_se_r101", "faster_rcnn_r101")
SMOKE = CONFIGS / "smoke/faster_rcnn_se_r50_synthetic.yaml"
TINY = ["INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 64]
R18 = ["MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64]  # training tests: same code, less compute


def build(config: Path, *opts) -> nn.Module:
    return build_model(get_config(config, [*opts, "MODEL.DEVICE", "cpu"]))


def images(n: int = 2, size: int = 64) -> list[dict]:
    """Detectron2 training inputs: random images with two boxes each."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.tensor([[4.0, 6.0, 30.0, 40.0], [30.0, 20.0, 60.0, 50.0]]))
        inst.gt_classes = torch.tensor([0, 2])
        image = torch.randint(0, 256, (3, size, size), generator=g).float()
        out.append({"image": image, "instances": inst, "height": size, "width": size})
    return out


def randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine terms, so a load that drops them shows in the features."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def se_resnet50():
    torch.manual_seed(0)
    return randomize_bn(create_model("se_resnet50"))


@pytest.fixture(scope="module")
def se_pkl(se_resnet50, tmp_path_factory):
    return save_detectron2(se_resnet50, tmp_path_factory.mktemp("w") / "se_resnet50.pkl", name="se_resnet50")


# ------------------------------------------------------------------------------------------------ building


@pytest.mark.parametrize("leaf", LEAVES)
def test_every_config_builds_with_our_names_and_pyramid(leaf):
    model = build(CONFIGS / f"{leaf}.yaml").eval()
    cfg = get_config(CONFIGS / f"{leaf}.yaml")
    bottom_up = model.backbone.bottom_up
    assert isinstance(bottom_up, SEResNet)
    shapes = {k: (v.channels, v.stride) for k, v in bottom_up.output_shape().items()}
    assert shapes == {"res2": (256, 4), "res3": (512, 8), "res4": (1024, 16), "res5": (2048, 32)}
    fpn = {k: (v.channels, v.stride) for k, v in model.backbone.output_shape().items()}
    assert fpn == {f"p{i}": (256, 2**i) for i in range(2, 7)}
    # the bottom-up parameters are our ResNet's, under our names
    name = f"{'se_' if cfg.MODEL.SENET.ENABLED else ''}resnet{cfg.MODEL.RESNETS.DEPTH}"
    with torch.device("meta"):
        reference = create_model(name)
    ours = {k for k in reference.state_dict() if not k.startswith("fc.") and "num_batches" not in k}
    theirs = {k.removeprefix("backbone.bottom_up.") for k in model.state_dict() if k.startswith("backbone.bottom_up.")}
    assert theirs == ours
    se_blocks = [m for m in bottom_up.modules() if isinstance(m, SqueezeExcite)]
    blocks = sum({50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[cfg.MODEL.RESNETS.DEPTH])
    assert len(se_blocks) == (blocks if "se_" in leaf else 0)
    # inference on a small image (the config's 800 px would only be slower)
    with torch.no_grad():
        out = model([{"image": torch.zeros(3, 64, 80), "height": 32, "width": 40}])
    assert out[0]["instances"].image_size == (32, 40)
    feats = bottom_up(torch.zeros(1, 3, 64, 96))
    assert {k: tuple(v.shape[1:]) for k, v in feats.items()} == {
        "res2": (256, 16, 24),
        "res3": (512, 8, 12),
        "res4": (1024, 4, 6),
        "res5": (2048, 2, 3),
    }


def test_se_and_plain_models_differ_only_in_se():
    se = build(CONFIGS / "faster_rcnn_se_r50.yaml").state_dict()
    plain = build(CONFIGS / "faster_rcnn_r50.yaml").state_dict()
    se_only = {k for k in se if ".se." in k}
    assert se_only and set(se) - se_only == set(plain)
    assert all(se[k].shape == plain[k].shape for k in plain)


@pytest.mark.parametrize("freeze_at", [0, 1, 3])
def test_freeze_at(freeze_at):
    model = build(SMOKE, "MODEL.BACKBONE.FREEZE_AT", freeze_at)
    bu = model.backbone.bottom_up
    assert isinstance(bu.bn1, FrozenBatchNorm2d) is (freeze_at >= 1)
    assert bu.conv1.weight.requires_grad is (freeze_at == 0)
    for stage, layer in enumerate((bu.layer1, bu.layer2, bu.layer3, bu.layer4), start=2):
        frozen = freeze_at >= stage
        assert all(isinstance(b, Bottleneck) for b in layer)
        assert all(p.requires_grad is not frozen for p in layer.parameters())
        norms = [m for m in layer.modules() if isinstance(m, nn.BatchNorm2d | FrozenBatchNorm2d)]
        assert all(isinstance(m, FrozenBatchNorm2d) is frozen for m in norms)
    assert all(p.requires_grad for p in model.backbone.fpn_lateral2.parameters())


NORMS = [("GN", nn.GroupNorm), ("SyncBN", nn.SyncBatchNorm), ("FrozenBN", FrozenBatchNorm2d)]


@pytest.mark.parametrize(("norm", "kind"), NORMS)
def test_norms(norm, kind):
    bu = build(SMOKE, "MODEL.RESNETS.NORM", norm).backbone.bottom_up
    assert isinstance(bu.bn1, kind) and isinstance(bu.layer4[0].downsample[1], kind)


def test_backbone_builds_only_the_stages_it_returns(se_pkl, se_resnet50):
    """OUT_FEATURES ["res4"]: res2..res4 built (no unused res5), our names, and ImageNet weights load into them."""
    cfg = get_config(CONFIGS / "faster_rcnn_se_r50.yaml", ["MODEL.RESNETS.OUT_FEATURES", ["res4"]])
    cfg.MODEL.BACKBONE.NAME = "build_se_resnet_backbone"
    backbone = build_backbone(cfg).eval()
    assert isinstance(backbone, SEResNet) and list(backbone.output_shape()) == ["res4"]
    assert not hasattr(backbone, "layer4") and [f["name"] for f in backbone.feature_info] == ["res2", "res3", "res4"]
    assert not any(k.startswith("layer4.") for k in backbone.state_dict())
    SENetCheckpointer(backbone).load(str(se_pkl))
    assert torch.equal(backbone.layer3[5].conv2.weight, se_resnet50.layer3[5].conv2.weight)
    assert torch.equal(backbone.layer1[0].se.fc1.weight, se_resnet50.layer1[0].se.fc1.weight)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert list(backbone(x)) == ["res4"]
        torch.testing.assert_close(backbone(x)["res4"], se_resnet50.forward_features(x)["res4"], rtol=1e-4, atol=1e-4)


def test_senet_config_keys_are_the_se_options():
    """MODEL.SENET holds one key per SEOptions field (its name in capitals) with that field's default."""
    cfg = get_config(SMOKE)
    keys = {name.upper() for name in SEOptions.names()}
    assert set(cfg.MODEL.SENET) == keys | {"ENABLED", "STEM_POOL_CEIL"}
    defaults = get_config(CONFIGS / "faster_rcnn_se_r50.yaml").MODEL.SENET
    assert SEOptions(**{f: defaults[f.upper()] for f in SEOptions.names()}) == SEOptions()


def test_se_reduction_from_a_yaml_reaches_the_se_blocks(tmp_path):
    """MODEL.SENET.REDUCTION 8 in a YAML on top of the Table 7 config: SEOptions(reduction=8) in every SE block."""
    config = tmp_path / "faster_rcnn_se_r50_r8.yaml"
    config.write_text(f"_BASE_: {CONFIGS / 'faster_rcnn_se_r50.yaml'}\nMODEL:\n  SENET:\n    REDUCTION: 8\n")
    bottom_up = build(config).backbone.bottom_up
    assert bottom_up.arch["se"] == SEOptions(reduction=8) and bottom_up.arch["se"].reduction == 8
    for layer in (bottom_up.layer1, bottom_up.layer2, bottom_up.layer3, bottom_up.layer4):
        for block in layer:
            assert block.se.fc1.out_channels == block.se.fc1.in_channels // 8
    assert bottom_up.layer4[0].se.fc1.weight.shape[:2] == (2048 // 8, 2048)
    plain = build(config, "MODEL.SENET.ENABLED", False).backbone.bottom_up
    assert plain.arch["se"] is None and plain.layer1[0].se is None


def test_bad_config_values_are_refused():
    with pytest.raises(ValueError, match="RES2_OUT_CHANNELS"):
        build(SMOKE, "MODEL.RESNETS.DEPTH", 18)
    with pytest.raises(ValueError, match="DEPTH=42"):
        build(SMOKE, "MODEL.RESNETS.DEPTH", 42)


# ------------------------------------------------------------------------------------------------ training


def test_training_steps_lower_the_losses_and_reach_the_se_blocks():
    """A few SGD steps on one batch: objectness and classification losses fall.

    (Not the total: the box-regression loss grows while the RPN learns, as more foreground proposals get sampled.)
    """
    model = build(SMOKE, *R18, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 64, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32)
    model.train()
    batch = images()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    history = []
    with EventStorage(0):
        for _ in range(8):
            losses = model(batch)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            if not history:
                grad = model.backbone.bottom_up.layer2[0].se.fc1.weight.grad
                assert grad is not None and grad.abs().sum() > 0
            optimizer.step()
            history.append({k: v.item() for k, v in losses.items()})
    rpn = [h["loss_rpn_cls"] for h in history]
    cls = [h["loss_cls"] for h in history]
    assert all(torch.isfinite(torch.tensor([sum(h.values()) for h in history])))
    assert all(b < a for a, b in zip(rpn, rpn[1:], strict=False)) and rpn[-1] < 0.85 * rpn[0], rpn
    assert cls[-1] < 0.5 * cls[0], cls


# ------------------------------------------------------------------------------------------------ weights


def _features(model, x):
    with torch.no_grad():
        return model.backbone.bottom_up(x)


@pytest.mark.parametrize("fmt", ["detectron2_pkl", "ours_safetensors", "timm_pth"])
def test_imagenet_weights_round_trip(fmt, se_resnet50, se_pkl, tmp_path):
    """ours -> file -> SENetCheckpointer: the detector's bottom-up computes what our ResNet computes."""
    if fmt == "detectron2_pkl":
        path = se_pkl
    elif fmt == "ours_safetensors":
        path = tmp_path / "se_resnet50.safetensors"
        save_checkpoint(se_resnet50, path, name="se_resnet50")
    else:
        path = tmp_path / "seresnet50.pth"  # a plain state dict in timm's names, as timm saves it
        torch.save(se_resnet50.state_dict(), path)
    model = build(CONFIGS / "faster_rcnn_se_r50.yaml").eval()
    SENetCheckpointer(model).load(str(path))
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ours = se_resnet50.forward_features(x)
    theirs = _features(model, x)
    for name in ours:
        torch.testing.assert_close(theirs[name], ours[name], rtol=1e-4, atol=1e-4)


def test_detector_checkpoint_resumes_exactly(tmp_path):
    model = build(CONFIGS / "faster_rcnn_se_r50.yaml")
    path = tmp_path / "model_final.pth"
    torch.save({"model": model.state_dict(), "iteration": 7}, path)
    fresh = build(CONFIGS / "faster_rcnn_se_r50.yaml")
    extra = SENetCheckpointer(fresh).load(str(path))
    assert extra["iteration"] == 7
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())


def test_detector_pkl_never_reaches_plain_pickle(tmp_path, monkeypatch):
    """A detector .pkl loads from the numpy-only read; detectron2's own plain pickle.load never sees it."""
    model = build(SMOKE, *R18)
    path = tmp_path / "model_final.pkl"
    weights = {k: v.numpy() for k, v in model.state_dict().items()}
    path.write_bytes(pickle.dumps({"model": weights, "__author__": "someone"}))

    def unsafe(*args, **kwargs):
        raise AssertionError("plain pickle.load read the checkpoint")

    monkeypatch.setattr(d2_checkpoint.pickle, "load", unsafe)
    fresh = build(SMOKE, *R18)
    SENetCheckpointer(fresh).load(str(path))
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "payload",
    [
        {"model": {"roi_heads.w": np.ones(2, np.float32)}, "__author__": "someone"},
        {"roi_heads.w": np.ones(2, np.float32), "roi_heads.w_momentum": np.zeros(2)},
    ],
    ids=["detectron2", "caffe2"],
)
def test_detector_pkl_is_what_detectron2_makes_of_it(payload, tmp_path):
    path = tmp_path / "model_final.pkl"
    path.write_bytes(pickle.dumps(payload))
    model = build(SMOKE, *R18)
    theirs = d2_checkpoint.DetectionCheckpointer(model)._load_file(str(path))  # a file of ours: trusted
    ours = SENetCheckpointer(model)._load_file(str(path))
    assert theirs["model"].keys() == ours["model"].keys()
    assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(ours["model"][k])) for k, v in theirs["model"].items())
    assert ours.get("matching_heuristics", False) == theirs.get("matching_heuristics", False)
    assert (ours["__author__"] == "Caffe2") == (theirs["__author__"] == "Caffe2")


def _unchanged(model, load):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "a failed load changed the model"
    return str(err.value)


def test_plain_weights_into_se_config_are_refused(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(create_model("resnet50").state_dict(), path)
    model = build(CONFIGS / "faster_rcnn_se_r50.yaml")
    message = _unchanged(model, lambda: SENetCheckpointer(model).load(str(path)))
    assert "no SE blocks" in message and "MODEL.SENET.ENABLED" in message


def test_other_se_reduction_names_the_config_key(tmp_path):
    """Weights with SE reduction 8 into the r=16 config: the key to set comes from the exception's options."""
    reference = create_model("se_resnet50", se_reduction=8)
    path = tmp_path / "se_resnet50_r8.pth"
    torch.save(reference.state_dict(), path)
    model = build(CONFIGS / "faster_rcnn_se_r50.yaml")
    with pytest.raises(OptionMismatchError) as err:
        SENetCheckpointer(model).load(str(path))
    assert err.value.options == {"se_reduction": 8.0}
    assert "In the detectron2 config set: MODEL.SENET.REDUCTION 8" in str(err.value)
    fixed = build(CONFIGS / "faster_rcnn_se_r50.yaml", "MODEL.SENET.REDUCTION", 8)
    SENetCheckpointer(fixed).load(str(path))
    assert torch.equal(fixed.backbone.bottom_up.layer4[2].se.fc2.weight, reference.layer4[2].se.fc2.weight)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"se_reduction": 8.0}, "MODEL.SENET.REDUCTION 8"),
        ({"se": False}, "MODEL.SENET.ENABLED False"),
        ({"se_bias": False}, "MODEL.SENET.BIAS False"),
        ({"se_divisor": 8}, "MODEL.SENET.DIVISOR 8"),
        ({"se_stages": (3, 4)}, "MODEL.SENET.STAGES [3,4]"),
        (
            {"stride_in_1x1": True, "stem_pool_ceil": True},
            "MODEL.RESNETS.STRIDE_IN_1X1 True MODEL.SENET.STEM_POOL_CEIL True",
        ),
        ({"layers": (3, 4, 23, 3)}, "MODEL.RESNETS.DEPTH 101"),
        ({"groups": 32, "width_per_group": 4}, "MODEL.RESNETS.NUM_GROUPS 32 MODEL.RESNETS.WIDTH_PER_GROUP 4"),
    ],
)
def test_config_hint_maps_option_names_to_detectron2_keys(options, expected):
    """From the options alone: the message says nothing the hint could be searched from."""
    hint = config_hint(OptionMismatchError("the weights need other options", options))
    assert hint == f"\nIn the detectron2 config set: {expected}"
    assert "No key" in config_hint(OptionMismatchError("", {"downsample_kernel": 3}))


def test_caffe_style_weights_need_caffe_geometry(tmp_path):
    caffe = create_model("se_resnet50", style="caffe")
    path = tmp_path / "se_resnet50_caffe.safetensors"
    save_checkpoint(caffe, path, name="se_resnet50", options={"style": "caffe"})
    model = build(CONFIGS / "faster_rcnn_se_r50.yaml")
    message = _unchanged(model, lambda: SENetCheckpointer(model).load(str(path)))
    assert "MODEL.RESNETS.STRIDE_IN_1X1" in message and "MODEL.SENET.STEM_POOL_CEIL" in message
    caffe_cfg = ["MODEL.RESNETS.STRIDE_IN_1X1", True, "MODEL.SENET.STEM_POOL_CEIL", True]
    fixed = build(CONFIGS / "faster_rcnn_se_r50.yaml", *caffe_cfg)
    SENetCheckpointer(fixed).load(str(path))
    assert torch.equal(fixed.backbone.bottom_up.layer2[0].conv1.weight, caffe.layer2[0].conv1.weight)


def test_bgr_weights_with_rgb_config_are_refused(se_resnet50, tmp_path):
    path = tmp_path / "se_resnet50_bgr.safetensors"
    bgr = {"channel_order": "BGR", "mean": [0.406, 0.456, 0.485], "std": [0.225, 0.224, 0.229]}
    save_checkpoint(se_resnet50, path, name="se_resnet50", preprocessing=bgr)
    model = build(CONFIGS / "faster_rcnn_se_r50.yaml")
    message = _unchanged(model, lambda: SENetCheckpointer(model).load(str(path)))
    assert "INPUT.FORMAT BGR" in message and "MODEL.PIXEL_MEAN" in message


def test_detector_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "plain_model_final.pth"
    torch.save({"model": build(CONFIGS / "faster_rcnn_r50.yaml").state_dict()}, path)
    model = build(CONFIGS / "faster_rcnn_se_r50.yaml")
    message = _unchanged(model, lambda: SENetCheckpointer(model).load(str(path)))
    assert "do not cover the SE-ResNet backbone" in message and "se.fc1.weight" in message


def test_missing_weights_file_is_one_clear_error(tmp_path):
    model = build(SMOKE)
    with pytest.raises(CheckpointError, match="no such file"):
        SENetCheckpointer(model).load(str(tmp_path / "pretrained/se_resnet50.pth"))


# ------------------------------------------------------------------------------------------------ data, CLI


@pytest.fixture
def tiny_synthetic(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))
    monkeypatch.setitem(d2data.SMOKE_OPTIONS, "num_train", 8)
    monkeypatch.setitem(d2data.SMOKE_OPTIONS, "num_val", 2)
    monkeypatch.setitem(d2data.SMOKE_OPTIONS, "image_size", 64)
    return tmp_path


def test_synthetic_dataset_is_registered_under_its_own_names(tiny_synthetic):
    assert set(d2data.SYNTHETIC_SPLITS) <= set(DatasetCatalog.list())
    dicts = DatasetCatalog.get("senet_synthetic_val")
    assert len(dicts) == 2 and Path(dicts[0]["file_name"]).is_file()
    meta = MetadataCatalog.get("senet_synthetic_val")
    assert meta.thing_classes == list(detection.SYNTHETIC_CLASSES)
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 3: 1, 7: 2, 11: 3}
    assert {a["category_id"] for d in dicts for a in d["annotations"]} <= {0, 1, 2, 3}
    assert Path(meta.json_file).is_relative_to(tiny_synthetic)


def test_missing_coco_names_the_layout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # detectron2's builtin coco paths are relative to ./datasets
    with pytest.raises(DatasetLayoutError) as err:
        prepare_datasets(get_config(CONFIGS / "faster_rcnn_se_r50.yaml"))
    message = str(err.value)
    assert "DETECTRON2_DATASETS" in message and "instances_train2017.json" in message and "coco_2017_train" in message


@pytest.mark.parametrize(
    ("config", "opts", "expected"),
    [
        ("faster_rcnn_se_r50.yaml", [], "dataset 'coco_2017_train': annotation file"),
        ("smoke/faster_rcnn_se_r50_synthetic.yaml", ["MODEL.WEIGHTS", "absent.pth"], "'absent.pth': no such file"),
    ],
    ids=["coco_missing", "weights_missing"],
)
def test_train_net_errors_are_one_line_with_many_gpus(config, opts, expected, tmp_path):
    """Checked before the workers start: an error inside a spawned worker comes back as a traceback wall."""
    no_data = ["DATASETS.TRAIN", "()", "DATASETS.TEST", "()"] if opts else []
    argv = [str(REPO / "tools/train_net.py"), "--config", str(CONFIGS / config), "--num-gpus", "2", *no_data, *opts]
    env = {**os.environ, "DETECTRON2_DATASETS": str(tmp_path)}
    done = subprocess.run([sys.executable, *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("error: ") and expected in done.stderr


def _args(*argv: str):
    return default_argument_parser().parse_args(["--config-file", str(SMOKE), *argv])


def test_weights_are_checked_unless_a_resume_finds_a_checkpoint(tmp_path, monkeypatch):
    opts = ["OUTPUT_DIR", str(tmp_path), "DATASETS.TRAIN", "()", "DATASETS.TEST", "()"]
    with pytest.raises(CheckpointError, match="no such file"):
        check(_args("--resume", *opts, "MODEL.WEIGHTS", str(tmp_path / "absent.pth")))
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    check(_args("--resume", *opts, "MODEL.WEIGHTS", str(tmp_path / "absent.pth")))  # the resume loads its own
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    check(_args(*opts, "MODEL.WEIGHTS", str(weights)))
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # chmod does not stop root, who runs CI
    with pytest.raises(CheckpointError, match="not readable"):
        check(_args(*opts, "MODEL.WEIGHTS", str(weights)))


def test_train_net_trains_evaluates_and_resumes(tiny_synthetic):
    out = tiny_synthetic / "out"
    common = [
        "OUTPUT_DIR", str(out), "SOLVER.IMS_PER_BATCH", 2, "SOLVER.CHECKPOINT_PERIOD", 2,
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", 64, *TINY, "DATALOADER.NUM_WORKERS", 0,
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", 64, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32, *R18,
    ]  # fmt: skip
    parser = default_argument_parser()
    args = parser.parse_args(["--config-file", str(SMOKE), *map(str, common), "SOLVER.MAX_ITER", "2"])
    train_net_main(args)
    metrics = json.loads((out / METRICS_FILE).read_text())["senet_synthetic_val"]["bbox"]
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(metrics)
    assert (out / "model_final.pth").is_file() and (out / "inference/senet_synthetic_val").is_dir()

    logged = len((out / "metrics.json").read_text().splitlines())
    args = parser.parse_args(["--config-file", str(SMOKE), "--resume", *map(str, common), "SOLVER.MAX_ITER", "3"])
    train_net_main(args)
    assert "Loading trainer from" in (out / "log.txt").read_text()
    resumed = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()[logged:]]
    trained = {m["iteration"] for m in resumed if "total_loss" in m}
    assert trained == {2}  # iterations 0-1 were not run again


def test_trainer_saves_atomically_through_one_checkpointer(tiny_synthetic, monkeypatch):
    """A save killed half-way leaves the previous checkpoint and `last_checkpoint` whole: fvcore writes in place,
    and a resumed run rewrites model_final.pth, the very file `last_checkpoint` names."""
    out = tiny_synthetic / "out"
    trainer = Trainer(get_config(SMOKE, ["OUTPUT_DIR", str(out), "DATALOADER.NUM_WORKERS", 0, *R18]))
    periodic = [h for h in trainer._hooks if isinstance(h, PeriodicCheckpointer)]
    assert isinstance(trainer.checkpointer, SENetCheckpointer) and periodic[0].checkpointer is trainer.checkpointer
    trainer.checkpointer.save("model_final", iteration=1)
    saved = (out / "model_final.pth").read_bytes()

    def killed(obj, f, *args, **kwargs):
        Path(f).write_bytes(saved[: len(saved) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer.checkpointer.save("model_final", iteration=2)
    assert (out / "model_final.pth").read_bytes() == saved
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


def test_bn_statistics_are_averaged_before_every_checkpoint_and_evaluation(tiny_synthetic, monkeypatch):
    """AverageBNStatistics runs after PreciseBN, before the hooks that save or evaluate, at their iterations and the
    last; in one process it changes nothing (the averaging across 2 processes: test_multiprocess.py)."""
    opts = [
        "OUTPUT_DIR", str(tiny_synthetic / "out"), "DATALOADER.NUM_WORKERS", 0, *R18, "SOLVER.MAX_ITER", 10,
        "SOLVER.CHECKPOINT_PERIOD", 4, "TEST.EVAL_PERIOD", 3, "TEST.PRECISE_BN.ENABLED", True,
    ]  # fmt: skip
    trainer = Trainer(get_config(SMOKE, opts))
    kinds = [type(h) for h in trainer._hooks]
    order = [PreciseBN, AverageBNStatistics, PeriodicCheckpointer, EvalHook]
    assert [kinds.index(kind) for kind in order] == sorted(kinds.index(kind) for kind in order)
    hook = trainer._hooks[kinds.index(AverageBNStatistics)]

    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.iter = 9
    hook.after_step()  # world size 1: no collective
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())

    averaged_at = []
    average = lambda model: averaged_at.append(trainer.iter + 1)  # noqa: E731
    monkeypatch.setattr("detection.detectron2.bn_stats.average_norm_statistics", average)
    for trainer.iter in range(10):
        hook.after_step()
    assert averaged_at == [3, 4, 6, 8, 9, 10]  # iterations done: every 3 (eval), every 4 (checkpoint), the last


# ------------------------------------------------------------------------------------------------ reliability


def test_detector_of_other_head_widths_is_refused_whole_unless_partial_is_allowed(tiny_synthetic):
    """A detector checkpoint with another FPN width: detectron2 would skip those tensors with warnings, and
    --eval-only would report AP 0 from random heads. Nothing is loaded, one error names the file and keys."""
    out = tiny_synthetic / "out"
    path = tiny_synthetic / "fpn64_model_final.pth"
    torch.save({"model": build(SMOKE, *R18, "MODEL.FPN.OUT_CHANNELS", 64).state_dict()}, path)
    model = build(SMOKE, *R18)
    message = _unchanged(model, lambda: SENetCheckpointer(model).load(str(path)))
    assert str(path) in message and "nothing was loaded" in message and "MODEL.ALLOW_PARTIAL_WEIGHTS" in message
    assert "backbone.fpn_lateral2.weight (64, 64, 1, 1) vs (128, 64, 1, 1)" in message

    opts = ["OUTPUT_DIR", str(out), "MODEL.WEIGHTS", str(path), "DATALOADER.NUM_WORKERS", "0", *map(str, R18 + TINY)]
    with pytest.raises(CheckpointError, match="does not fit this model"):
        train_net_main(_args("--eval-only", *opts))
    assert not (out / METRICS_FILE).exists()

    partial = SENetCheckpointer(model, allow_partial=True)
    partial.load(str(path))  # asked for: the backbone fits, the FPN keeps its initialisation
    saved = torch.load(path, weights_only=True)["model"]
    assert torch.equal(model.state_dict()["backbone.bottom_up.conv1.weight"], saved["backbone.bottom_up.conv1.weight"])
    assert get_config(SMOKE).MODEL.ALLOW_PARTIAL_WEIGHTS is False


def test_coco_metrics_are_strict_json(tmp_path):
    """COCOeval's NaN (no small objects in the split, say) is null: a bare NaN is not JSON."""
    from detection.detectron2.engine import write_metrics

    cfg = get_config(SMOKE, ["OUTPUT_DIR", str(tmp_path)])
    results = {"bbox": {"AP": 12.5, "APs": float("nan"), "AP-red_rectangle": float("inf")}}
    text = write_metrics(cfg, results).read_text()

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    metrics = json.loads(text, parse_constant=refuse)
    assert metrics == {"senet_synthetic_val": {"bbox": {"AP": 12.5, "APs": None, "AP-red_rectangle": None}}}


def test_stale_temp_files_of_a_killed_save_are_removed_at_the_start(tiny_synthetic):
    """A kill -9 mid-save leaves `.model_final.pth.<hex>.tmp` (a whole checkpoint's size): the next run removes it,
    and nothing else."""
    out = tiny_synthetic / "out"
    out.mkdir()
    stale = out / ".model_final.pth.0123456789ab.tmp"
    stale.write_bytes(b"half a checkpoint")
    os.utime(stale, (1e9, 1e9))
    kept = [out / "notes.tmp", out / "model_0000001.pth"]
    for path in kept:
        path.write_bytes(b"x")
    opts = ["OUTPUT_DIR", str(out), "MODEL.WEIGHTS", "", "DATALOADER.NUM_WORKERS", "0", *map(str, R18 + TINY)]
    train_net_main(_args("--eval-only", *opts))
    assert not stale.exists() and all(path.exists() for path in kept)
