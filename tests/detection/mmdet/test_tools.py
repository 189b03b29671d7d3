"""MMDetection's own tools on our configs and checkpoints: tools/test.py of the installed package, DetInferencer,
init_detector, `load_from` of a detector of mmdet's own ResNet, and mmengine's model-zoo names in init_cfg."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .common import require_mmdet

require_mmdet()

import mmdet  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.logging import HistoryBuffer  # noqa: E402
from mmengine.runner import Runner  # noqa: E402
from mmengine.runner import checkpoint as mm_checkpoint  # noqa: E402

from backbones import CheckpointError, OptionMismatchError, create_model  # noqa: E402
from detection.mmdet.backbone import SEResNet  # noqa: E402

from .common import CONFIGS, SMOKE, TINY, mmdet_runner, randomize_norms  # noqa: E402

MMDET = Path(mmdet.__file__).parent / ".mim"  # what mmdet's package ships of its repository: tools/, configs/
# The smoke config at SE-ResNet-18 with one block per stage and 2 validation images: the real tools, less compute
TINY_OPTIONS = {
    "model.backbone.depth": 18,
    "model.backbone.stage_blocks": TINY,
    "model.neck.in_channels": [64, 128, 256, 512],
    "synthetic_data.num_train": 4,
    "synthetic_data.num_val": 2,
    "model.test_cfg.rcnn.score_thr": 0.0,  # an untrained detector scores below the default 0.05
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint written by tools/train_mmdet.py (2 iterations of the tiny smoke run) and its data root."""
    from tools.train_mmdet import main

    root = tmp_path_factory.mktemp("mmdet_tools")
    options = {
        **TINY_OPTIONS,
        "train_cfg.max_iters": 2,
        "train_dataloader.batch_size": 2,
        "default_hooks.checkpoint.interval": 2,
        "val_dataloader": None,
        "val_cfg": None,
        "val_evaluator": None,
    }
    argv = [str(SMOKE), "--work-dir", str(root / "run"), "--cfg-options"]
    argv += [f"{k}={v}".replace(" ", "") for k, v in options.items()]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DETECTRON2_DATASETS", str(root / "data"))
        main(argv)
    return root / "run" / "iter_2.pth", root / "data"


def test_checkpoint_reads_weights_only(trained):
    """torch's default weights-only load reads it: importing our mmdet module allow-lists MMEngine's classes."""
    assert HistoryBuffer in torch.serialization.get_safe_globals()
    checkpoint = torch.load(trained[0])  # weights_only is torch's default; nothing switches it off
    assert "backbone.layer4.0.se.fc1.weight" in checkpoint["state_dict"]


def test_mmdet_test_py_evaluates_our_checkpoint(trained, tmp_path):
    """mmdet's own tools/test.py, in a fresh process, on our config and a tools/train_mmdet.py checkpoint: the
    config's custom_imports registers the backbone and allow-lists the checkpoint's classes."""
    checkpoint, data = trained
    options = [f"{k}={v}".replace(" ", "") for k, v in TINY_OPTIONS.items()]
    command = [sys.executable, str(MMDET / "tools" / "test.py"), str(SMOKE), str(checkpoint)]
    command += ["--work-dir", str(tmp_path), "--cfg-options", *options]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    env.update(DETECTRON2_DATASETS=str(data), OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "Load checkpoint from" in output and "coco/bbox_mAP:" in output


def test_det_inferencer_and_init_detector_predict(trained, monkeypatch):
    from mmdet.apis import DetInferencer, inference_detector, init_detector

    checkpoint, data = trained
    monkeypatch.setenv("DETECTRON2_DATASETS", str(data))
    cfg = mmdet_runner.load_config(SMOKE, cfg_options=TINY_OPTIONS)
    image = str(next((data / "synthetic_coco" / "val").iterdir()))
    saved = torch.load(checkpoint)["state_dict"]["backbone.layer1.0.se.fc1.weight"]

    inferencer = DetInferencer(model=cfg, weights=str(checkpoint), device="cpu", show_progress=False)
    assert torch.equal(inferencer.model.backbone.layer1[0].se.fc1.weight, saved)
    (prediction,) = inferencer(image, no_save_vis=True, pred_score_thr=0.0)["predictions"]
    assert len(prediction["bboxes"]) == len(prediction["scores"]) == len(prediction["labels"]) > 0
    assert all(0 <= label < 4 for label in prediction["labels"])

    detector = init_detector(cfg, str(checkpoint), device="cpu")
    assert torch.equal(detector.backbone.layer1[0].se.fc1.weight, saved)
    boxes = inference_detector(detector, image).pred_instances.bboxes
    assert boxes.shape[1] == 4 and len(boxes) > 0


def test_load_from_an_mmdet_resnet_detector(tmp_path):
    """MMDetection's own R50 Faster R-CNN (its ResNet) saved as a detector checkpoint loads with `load_from`
    into our R50 config through mmengine's Runner: every tensor, backbone included, lands where it was."""
    theirs_cfg = Config.fromfile(MMDET / "configs" / "faster_rcnn" / "faster-rcnn_r50_fpn_2x_coco.py")
    theirs_cfg.model.backbone.init_cfg = None
    theirs = randomize_norms(MODELS.build(theirs_cfg.model))
    path = tmp_path / "faster_rcnn_r50.pth"
    torch.save({"state_dict": theirs.state_dict()}, path)

    ours_config = CONFIGS / "faster-rcnn_r50_fpn_2x_coco.py"
    cfg = mmdet_runner.load_config(ours_config, work_dir=str(tmp_path), load_from=str(path))
    runner = Runner.from_cfg(cfg)
    runner.load_or_resume()
    ours, expected = runner.model.state_dict(), theirs.state_dict()
    assert type(runner.model.backbone) is SEResNet and list(ours) == list(expected)
    assert all(torch.equal(ours[k], v) for k, v in expected.items())


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """torch's hub cache in a temporary folder: `name` -> where mmengine keeps that zoo name's download."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    urls = {**mm_checkpoint.get_torchvision_models(), **mm_checkpoint.get_external_models()}
    return lambda name: tmp_path / "checkpoints" / Path(urls[name]).name


def _pretrained(checkpoint: str, **kwargs) -> SEResNet:
    net = SEResNet(50, se=None, stage_blocks=TINY, init_cfg=dict(type="Pretrained", checkpoint=checkpoint), **kwargs)
    net.init_weights()
    return net


def test_model_zoo_names_read_the_hub_cache(hub_cache):
    """torchvision:// and open-mmlab:// as mmdet's base configs use them: the file mmengine downloads them to,
    with the style of the zoo's weights checked; a missing file is one clear error (nothing downloads here)."""
    with pytest.raises(CheckpointError, match=r"torchvision://resnet50: .*resnet50-\w+\.pth.*not there"):
        _pretrained("torchvision://resnet50")
    weights = create_model("resnet50", layers=TINY).state_dict()
    for name in ("resnet50", "detectron2/resnet50_caffe"):
        hub_cache(name).parent.mkdir(exist_ok=True)
        torch.save(weights, hub_cache(name))
    assert torch.equal(_pretrained("torchvision://resnet50").layer1[0].conv1.weight, weights["layer1.0.conv1.weight"])
    with pytest.raises(OptionMismatchError, match="model.backbone.style=caffe"):
        _pretrained("open-mmlab://detectron2/resnet50_caffe")  # Caffe-style weights into a pytorch-style model
    net = _pretrained("open-mmlab://detectron2/resnet50_caffe", style="caffe")
    assert torch.equal(net.layer4[0].conv1.weight, weights["layer4.0.conv1.weight"])
    with pytest.raises(CheckpointError, match="no 'resnet51'"):
        _pretrained("torchvision://resnet51")
