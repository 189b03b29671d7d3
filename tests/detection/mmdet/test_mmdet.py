"""The MMDetection path: our SE-ResNet registered in mmdet, the Table 7 configs, the entry point, the smoke run."""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from .common import require_mmdet

require_mmdet()

from mmdet.registry import MODELS  # noqa: E402
from mmdet.testing import demo_mm_inputs  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402
from mmengine.optim import OptimWrapper  # noqa: E402

from backbones import CheckpointError, OptionMismatchError, SEOptions, create_model, load_pretrained  # noqa: E402
from detection.mmdet.backbone import SEResNet, config_hint, se_options  # noqa: E402
from detection.synthetic import SMOKE_OPTIONS, SYNTHETIC_CLASSES  # noqa: E402

from .common import CONFIGS, REPO, SMOKE, TINY, mmdet_runner, randomize_norms  # noqa: E402

TABLE7 = {
    "faster-rcnn_se-r50_fpn_2x_coco.py": (50, True),
    "faster-rcnn_r50_fpn_2x_coco.py": (50, False),
    "faster-rcnn_se-r101_fpn_2x_coco.py": (101, True),
    "faster-rcnn_r101_fpn_2x_coco.py": (101, False),
}
KEY = "model.backbone."
# The slow smoke test: iterations and the AP it must beat (measured: see the README's MMDetection section).
SMOKE_TEST_ITERS = 200
SMOKE_MIN_AP, SMOKE_MIN_AP50 = 0.3, 0.6


def _config(name):
    return mmdet_runner.load_config(CONFIGS / name)


def _tiny_detector(cfg):
    cfg = copy.deepcopy(cfg.model)
    cfg.backbone.update(stage_blocks=TINY, init_cfg=None)
    model = MODELS.build(cfg)
    model.init_weights()
    return model


# ---------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", sorted(TABLE7))
def test_table7_config_values(name, monkeypatch):
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    cfg = _config(name)
    bb = cfg.model.backbone
    assert bb.type == "SEResNet" and (bb.depth, se_options(bb.se) is not None) == TABLE7[name]
    assert bb.se == (dict(reduction=16) if TABLE7[name][1] else None)  # the paper's r, spelt out
    # torchvision/timm-style ImageNet weights; stem + res2 frozen and BN statistics kept, as mmdet's R50-FPN
    assert (bb.style, bb.frozen_stages, bb.norm_eval, bb.init_cfg.type) == ("pytorch", 1, True, "Pretrained")
    assert cfg.custom_imports.imports == ["detection.mmdet.backbone"]
    # MMDetection's own 2x schedule, inherited: 24 epochs, lr 0.02 (x0.1 at 16, 22), 8 GPUs x 2 = 16 images
    assert cfg.train_cfg.max_epochs == 24
    assert cfg.optim_wrapper.optimizer.lr == 0.02 and cfg.optim_wrapper.optimizer.weight_decay == 1e-4
    assert [s for s in cfg.param_scheduler if s.type == "MultiStepLR"][0].milestones == [16, 22]
    assert cfg.train_dataloader.batch_size * 8 == cfg.auto_scale_lr.base_batch_size == 16
    # COCO 2017 train / val (= minival) where Detectron2 looks for it
    train, val = cfg.train_dataloader.dataset, cfg.val_dataloader.dataset
    assert (train.data_root, train.ann_file, train.data_prefix.img) == (
        "datasets/coco/",
        "annotations/instances_train2017.json",
        "train2017/",
    )
    assert (val.ann_file, val.data_prefix.img) == ("annotations/instances_val2017.json", "val2017/")
    assert (
        cfg.val_evaluator.ann_file == cfg.test_evaluator.ann_file == "datasets/coco/annotations/instances_val2017.json"
    )
    assert cfg.model.roi_head.bbox_head.num_classes == 80


def test_dataset_root_follows_detectron2_datasets(monkeypatch, tmp_path):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    cfg = _config("faster-rcnn_r101_fpn_2x_coco.py")
    assert cfg.train_dataloader.dataset.data_root == f"{tmp_path}/coco/"
    assert cfg.test_evaluator.ann_file == f"{tmp_path}/coco/annotations/instances_val2017.json"


def test_se_and_plain_configs_differ_only_in_se():
    for depth in (50, 101):
        se_name, plain_name = f"faster-rcnn_se-r{depth}_fpn_2x_coco.py", f"faster-rcnn_r{depth}_fpn_2x_coco.py"
        se_cfg, plain_cfg = _config(se_name).to_dict(), _config(plain_name).to_dict()
        for cfg in (se_cfg, plain_cfg):
            cfg.pop("work_dir")
            cfg["model"]["backbone"].pop("se")
            cfg["model"]["backbone"].pop("init_cfg")  # the ImageNet weights of each network
        assert se_cfg == plain_cfg
        # and the built detectors differ by exactly the SE parameters
        se_keys = set(_tiny_detector(_config(se_name)).state_dict())
        plain_keys = set(_tiny_detector(_config(plain_name)).state_dict())
        assert plain_keys < se_keys
        assert se_keys - plain_keys and all(".se." in k for k in se_keys - plain_keys)


@pytest.mark.parametrize("name", sorted(TABLE7))
def test_table7_detector_trains_and_predicts(name):
    """Full-depth detector of each config on CPU: one SGD step with finite losses, then inference."""
    cfg = _config(name)
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    model.init_weights()
    depth = TABLE7[name][0]
    assert sum(len(getattr(model.backbone, f"layer{i}")) for i in range(1, 5)) == (16 if depth == 50 else 33)
    # the trunk sits directly under the backbone, named as mmdet's own ResNet names it
    names = set(model.state_dict())
    assert "backbone.conv1.weight" in names and "backbone.layer1.0.conv1.weight" in names
    assert not any(k.startswith("backbone.body.") for k in names)
    assert any(k.startswith("backbone.layer4.0.se.fc1.") for k in names) is TABLE7[name][1]
    model.train()
    optim = OptimWrapper(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3))
    before = model.rpn_head.rpn_conv.weight.detach().clone()
    data = demo_mm_inputs(batch_size=1, image_shapes=[(3, 128, 160)], num_items=[3], num_classes=80)
    losses = model.train_step(data, optim)
    assert {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox"} <= set(losses)
    assert all(torch.isfinite(v).all() for v in losses.values())
    assert not torch.equal(before, model.rpn_head.rpn_conv.weight), "the step must update the weights"
    frozen = [p.grad for p in model.backbone.layer1.parameters()]
    assert all(g is None for g in frozen), "frozen_stages=1 keeps res2 out of the backward pass"

    model.eval()
    with torch.no_grad():
        (pred,) = model.test_step(demo_mm_inputs(batch_size=1, image_shapes=[(3, 128, 160)], num_classes=80))
    boxes = pred.pred_instances
    assert boxes.bboxes.shape[1] == 4 and len(boxes.bboxes) == len(boxes.scores) == len(boxes.labels) <= 100
    assert all(0 <= label < 80 for label in boxes.labels.tolist())


# ---------------------------------------------------------------------------------------------- backbone


@pytest.mark.parametrize(("depth", "channels"), [(18, (64, 128, 256, 512)), (50, (256, 512, 1024, 2048))])
def test_backbone_contract(depth, channels):
    net = SEResNet(depth, stage_blocks=TINY, out_indices=(0, 1, 2, 3))
    assert net.out_channels == channels and net.strides == (4, 8, 16, 32)
    net.eval()
    outs = net(torch.randn(2, 3, 96, 128))
    assert [tuple(o.shape) for o in outs] == [
        (2, c, 96 // s, 128 // s) for c, s in zip(channels, (4, 8, 16, 32), strict=True)
    ]
    subset = SEResNet(depth, stage_blocks=TINY, out_indices=(1, 3)).eval()
    assert [o.shape[1] for o in subset(torch.randn(1, 3, 64, 64))] == [channels[1], channels[3]]
    with pytest.raises(AssertionError, match="out_indices"):  # mmdet's ResNet asserts its arguments
        SEResNet(depth, out_indices=(4,))
    with pytest.raises(KeyError, match="depth"):  # and looks its depth up
        SEResNet(26)


def test_backbone_matches_mmdet_resnet():
    """With SE off our backbone is a drop-in for mmdet's ResNet: its weights load and give the same features."""
    theirs = MODELS.build(dict(type="ResNet", depth=50, norm_eval=False))
    theirs.eval()  # mmdet's ResNet.train() returns None
    with torch.no_grad():
        for m in theirs.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
    ours = SEResNet(50, se=False).eval()
    load_pretrained(ours, theirs.state_dict())
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        for a, b in zip(ours(x), theirs(x), strict=True):
            assert torch.equal(a, b)


def _mmdet_resnet(**kwargs) -> torch.nn.Module:
    model = randomize_norms(MODELS.build(dict(type="ResNet", depth=50, **kwargs)))
    model.eval()  # mmdet's ResNet.train() returns None
    return model


def _same_features(ours, theirs, size: int = 64) -> bool:
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        return all(torch.equal(a, b) for a, b in zip(ours.eval()(x), theirs(x), strict=True))


@pytest.mark.parametrize("norm_cfg", [dict(type="BN"), dict(type="GN", num_groups=32)], ids=["BN", "GN"])
@pytest.mark.parametrize("style", ["pytorch", "caffe"])
def test_state_dict_is_mmdet_resnet_layout(style, norm_cfg):
    """The keys of mmdet's ResNet in its order (norms named by type: gn1 under GroupNorm), so its state dict
    loads as it is (torch's load_state_dict, as mmengine's load_from) and computes the same features."""
    theirs = _mmdet_resnet(style=style, norm_cfg=norm_cfg)
    ours = SEResNet(50, se=None, style=style, norm_cfg=norm_cfg)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    assert _same_features(ours, theirs)


@pytest.mark.parametrize(("style", "norm"), [("caffe", dict(type="BN")), ("pytorch", dict(type="GN", num_groups=32))])
def test_init_cfg_reads_an_mmdet_detector_by_mmengine_rules(style, norm, tmp_path):
    """init_cfg on a detector file of mmdet's own ResNet: `prefix` is looked up inside its state_dict (as
    mmengine's Pretrained init), the stride position is the config's style (plain ResNet names carry none, as in
    mmdet), and mmdet's gn1 is our bn1."""
    theirs = _mmdet_resnet(style=style, norm_cfg=norm)
    path = tmp_path / "detector.pth"
    state = {f"backbone.{k}": v for k, v in theirs.state_dict().items()}
    state["neck.lateral_convs.0.conv.weight"] = torch.ones(1)
    torch.save({"meta": {"epoch": 12}, "state_dict": state}, path)
    init_cfg = dict(type="Pretrained", checkpoint=str(path), prefix="backbone.")
    ours = SEResNet(50, se=None, style=style, norm_cfg=norm, init_cfg=init_cfg)
    ours.init_weights()
    assert _same_features(ours, theirs)


def test_mmdet_resnet_arguments():
    """mmdet's ResNet signature with its exceptions; what only mmdet's ResNet builds is refused by name."""
    with pytest.raises(KeyError):
        SEResNet(20)
    bad = [dict(num_stages=0), dict(num_stages=5), dict(strides=(1,), dilations=(1, 1), num_stages=3)]
    bad += [dict(style="tensorflow"), dict(num_stages=3), dict(frozen_stages=5)]  # num_stages=3: out_indices 3
    for kwargs in bad:
        with pytest.raises(AssertionError):
            SEResNet(50, **kwargs)
    with pytest.raises(TypeError):
        SEResNet(50, pretrained=0)
    with pytest.raises(AssertionError, match="init_cfg and pretrained"):
        SEResNet(50, pretrained="a.pth", init_cfg=dict(type="Pretrained", checkpoint="b.pth"))
    with pytest.warns(UserWarning, match="pretrained is deprecated"):
        net = SEResNet(50, stage_blocks=TINY, pretrained="a.pth")
    assert net.init_cfg == dict(type="Pretrained", checkpoint="a.pth")
    dcn = dict(type="DCN", deform_groups=1, fallback_on_stride=False)
    unsupported = dict(dcn=dcn, plugins=[dict(cfg=dict(type="ContextBlock"), position="after_conv3")])
    unsupported.update(deep_stem=True, avg_down=True, dilations=(1, 1, 1, 2), base_channels=32)
    for name, value in unsupported.items():
        with pytest.raises(NotImplementedError, match=name):
            SEResNet(50, **{name: value})
    # mmdet's defaults, spelt out, build
    SEResNet(50, stage_blocks=TINY, num_stages=4, strides=(1, 2, 2, 2), conv_cfg=None, stem_channels=64, dcn=None)


def test_with_cp_checkpoints_every_block_with_the_same_gradients(monkeypatch):
    import detection.mmdet.backbone as mmdet_backbone

    calls = []
    real = mmdet_backbone.checkpoint
    monkeypatch.setattr(mmdet_backbone, "checkpoint", lambda fn, *a, **kw: calls.append(fn) or real(fn, *a, **kw))
    net = SEResNet(50, stage_blocks=TINY, with_cp=True).train()
    x = torch.randn(2, 3, 64, 64)

    def gradients():
        net.zero_grad()
        sum(o.square().sum() for o in net(x)).backward()
        return [p.grad.clone() for p in net.parameters()]

    checkpointed = gradients()
    assert calls == [getattr(net, f"layer{i}")[0] for i in range(1, 5)]  # every block, recomputed in backward
    net.with_cp = False
    assert all(torch.allclose(a, b) for a, b in zip(checkpointed, gradients(), strict=True))
    net.with_cp, calls[:] = True, []
    with torch.no_grad():
        net(x)
    assert not calls  # nothing to recompute without autograd


@pytest.mark.parametrize("norm_eval", [True, False])
def test_frozen_stages_and_norm_eval(norm_eval):
    net = SEResNet(50, stage_blocks=TINY, frozen_stages=2, norm_eval=norm_eval)
    net.train()
    frozen = [net.conv1, net.bn1, net.layer1, net.layer2]
    free = [net.layer3, net.layer4]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for m in free for p in m.parameters())
    assert all(not m.training for part in frozen for m in part.modules())
    free_bns = [m for part in free for m in part.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert free_bns and all(m.training is (not norm_eval) for m in free_bns)
    assert net.layer3[0].conv1.training  # convs are in train mode either way
    # frozen BN statistics do not move in a training forward pass
    before = net.layer1[0].bn1.running_mean.clone()
    net(torch.randn(2, 3, 64, 64))
    assert torch.equal(before, net.layer1[0].bn1.running_mean)


def test_norm_cfg_builds_the_requested_norm():
    net = SEResNet(50, stage_blocks=TINY, norm_cfg=dict(type="GN", num_groups=16, requires_grad=False))
    norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 1 + 4 * 4  # stem + 3 per block + downsample, one block per stage
    assert all(not p.requires_grad for m in norms for p in m.parameters())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())


def test_caffe_style_moves_the_stride_only():
    """style has mmdet's meaning (where the stride sits); the Caffe SENet weights' stem pool is its own option."""
    pytorch, caffe = SEResNet(50, stage_blocks=TINY), SEResNet(50, stage_blocks=TINY, style="caffe")
    assert pytorch.layer2[0].conv2.stride == (2, 2) and pytorch.layer2[0].conv1.stride == (1, 1)
    assert caffe.layer2[0].conv1.stride == (2, 2) and caffe.layer2[0].conv2.stride == (1, 1)
    assert not caffe.maxpool.ceil_mode and caffe.maxpool.padding == 1
    ceil = SEResNet(50, stage_blocks=TINY, style="caffe", stem_pool_ceil=True)
    assert ceil.maxpool.ceil_mode and ceil.maxpool.padding == 0
    assert ceil.eval()(torch.randn(1, 3, 64, 64))[0].shape[-2:] == (16, 16)


def test_resnext_options_build_the_registry_model():
    """groups / base_width give exactly backbones' se_resnext50_32x4d (same names and shapes, same features)."""
    ours = SEResNet(50, groups=32, base_width=4, stage_blocks=TINY).eval()
    reference = create_model("se_resnext50_32x4d", layers=TINY, num_classes=0).eval()
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in reference.state_dict().items()}
    load_pretrained(ours, reference.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x)[3], reference.forward_features(x)["res5"])


def test_se_options_reach_the_blocks():
    net = SEResNet(50, stage_blocks=TINY, se=dict(reduction=8, stages=(3, 4), gate="tanh"))
    assert net.arch["se"] == SEOptions(reduction=8, stages=(3, 4), gate="tanh")
    assert net.layer1[0].se is None and net.layer4[0].se is None
    se = net.layer2[0].se
    assert se.fc1.out_channels == 512 // 8 and se.gate_name == "tanh"
    for off in (None, False):
        assert SEResNet(50, stage_blocks=TINY, se=off).layer2[0].se is None
    assert SEResNet(50, stage_blocks=TINY, se=True).arch["se"] == SEOptions()
    with pytest.raises(ValueError, match="unknown option.*'ratio'"):
        SEResNet(50, se=dict(ratio=8))


def test_se_reduction_from_the_config_reaches_the_se_blocks():
    """`model.backbone.se.reduction=8` on the Table 7 config: SEOptions(reduction=8) in every SE block."""
    cfg = mmdet_runner.load_config(
        CONFIGS / "faster-rcnn_se-r50_fpn_2x_coco.py", cfg_options={"model.backbone.se.reduction": 8}
    )
    assert cfg.model.backbone.se == dict(reduction=8)
    backbone = _tiny_detector(cfg).backbone
    assert backbone.arch["se"] == SEOptions(reduction=8) and backbone.arch["se"].reduction == 8
    for i, channels in enumerate((256, 512, 1024, 2048), start=1):
        fc1 = getattr(backbone, f"layer{i}")[0].se.fc1
        assert (fc1.in_channels, fc1.out_channels) == (channels, channels // 8)


def test_only_the_stages_returned_are_built():
    net = SEResNet(50, stage_blocks=TINY, out_indices=(0, 1), frozen_stages=4)
    assert [f["name"] for f in net.feature_info] == ["res2", "res3"]
    assert not hasattr(net, "layer3") and not any(k.startswith(("layer3.", "layer4.")) for k in net.state_dict())
    assert [tuple(o.shape) for o in net.eval()(torch.randn(1, 3, 64, 64))] == [(1, 256, 16, 16), (1, 512, 8, 8)]
    assert not any(p.requires_grad for p in net.parameters())


# ---------------------------------------------------------------------------------------------- weights


@pytest.fixture(scope="module")
def imagenet_checkpoint(tmp_path_factory):
    """A random 'ImageNet' SE-ResNet-50 (one block per stage) saved as a Lightning checkpoint, and its model."""
    reference = randomize_norms(create_model("se_resnet50", layers=TINY))
    path = tmp_path_factory.mktemp("weights") / "se_resnet50.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in reference.state_dict().items()}, "epoch": 3}, path)
    return path, reference.eval()


def test_init_cfg_pretrained_gives_our_resnets_features(imagenet_checkpoint):
    path, reference = imagenet_checkpoint
    cfg = _config("faster-rcnn_se-r50_fpn_2x_coco.py")
    cfg.model.backbone.update(stage_blocks=TINY, init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    detector = MODELS.build(cfg.model)
    detector.init_weights()  # what the Runner does before training
    backbone = detector.backbone.eval()
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        expected = reference.forward_features(x)
        got = backbone(x)
    for name, feature in zip(("res2", "res3", "res4", "res5"), got, strict=True):
        assert torch.equal(feature, expected[name]), name


def test_mismatched_weights_are_refused_and_leave_the_backbone_unchanged(tmp_path):
    plain = create_model("resnet50", layers=TINY)
    path = tmp_path / "resnet50.pth"
    torch.save(plain.state_dict(), path)
    net = SEResNet(50, stage_blocks=TINY, init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(CheckpointError, match=str(path)):
        net.init_weights()
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        SEResNet(50, init_cfg=dict(type="Pretrained", checkpoint=str(tmp_path / "absent.pth"))).init_weights()


def test_imagenet_weights_load_into_fewer_stages(imagenet_checkpoint):
    """The whole ImageNet network's checkpoint, through init_cfg, into a backbone that returns res2, res3 only."""
    path, reference = imagenet_checkpoint
    net = SEResNet(50, stage_blocks=TINY, out_indices=(0, 1), init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    net.init_weights()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = reference.forward_features(x)
        assert all(torch.equal(a, expected[n]) for a, n in zip(net.eval()(x), ("res2", "res3"), strict=True))


def test_other_se_reduction_names_the_config_key(tmp_path):
    """Weights with SE reduction 8 into the r=16 backbone: the --cfg-options to set, from the exception's options."""
    reference = create_model("se_resnet50", layers=TINY, se_reduction=8)
    path = tmp_path / "se_resnet50_r8.pth"
    torch.save(reference.state_dict(), path)
    init_cfg = dict(type="Pretrained", checkpoint=str(path))
    net = SEResNet(50, stage_blocks=TINY, init_cfg=init_cfg)
    with pytest.raises(OptionMismatchError) as err:
        net.init_weights()
    assert err.value.options == {"se_reduction": 8.0} and str(path) in str(err.value)
    assert "In the mmdet config (--cfg-options) set: model.backbone.se.reduction=8" in str(err.value)
    fixed = SEResNet(50, stage_blocks=TINY, se=dict(reduction=8), init_cfg=init_cfg)
    fixed.init_weights()
    assert torch.equal(fixed.layer4[0].se.fc1.weight, reference.layer4[0].se.fc1.weight)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"se_reduction": 8.0}, "model.backbone.se.reduction=8"),
        ({"se": False}, "model.backbone.se=False"),
        ({"se_bias": False, "se_divisor": 8}, "model.backbone.se.bias=False model.backbone.se.divisor=8"),
        ({"se_stages": (3, 4)}, "model.backbone.se.stages=[3,4]"),
        ({"stride_in_1x1": True, "stem_pool_ceil": True}, f"{KEY}style=caffe {KEY}stem_pool_ceil=True"),
        ({"stride_in_1x1": False}, "model.backbone.style=pytorch"),
        ({"layers": (3, 4, 23, 3)}, "model.backbone.depth=101"),
        ({"groups": 32, "width_per_group": 4}, "model.backbone.groups=32 model.backbone.base_width=4"),
    ],
)
def test_config_hint_maps_option_names_to_mmdet_keys(options, expected):
    """From the options alone: the message says nothing the hint could be searched from."""
    hint = config_hint(OptionMismatchError("the weights need other options", options))
    assert hint == f"\nIn the mmdet config (--cfg-options) set: {expected}"
    assert "No key" in config_hint(OptionMismatchError("", {"deep_stem": True}))


def test_same_checkpoint_same_features_in_detectron2(tmp_path):
    """One backbone, two engines: one ImageNet checkpoint, loaded by each engine's Table 7 config, same features."""
    pytest.importorskip("detectron2", reason="detectron2 is not installed (no package registry carries it)")
    from detection.detectron2.engine import build_model_from_config

    reference = randomize_norms(create_model("se_resnet50"))
    path = tmp_path / "se_resnet50.pth"
    torch.save(reference.state_dict(), path)

    d2_config = REPO / "configs" / "detectron2" / "faster_rcnn_se_r50.yaml"
    d2 = build_model_from_config(d2_config, ["MODEL.WEIGHTS", str(path)], load_weights=True)
    cfg = _config("faster-rcnn_se-r50_fpn_2x_coco.py")
    cfg.model.backbone.init_cfg.checkpoint = str(path)
    mm = MODELS.build(cfg.model)
    mm.init_weights()
    x = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        d2_features = d2.backbone.bottom_up(x)
        mm_features = mm.backbone.eval()(x)
        expected = reference.eval().forward_features(x)
    for name, feature in zip(("res2", "res3", "res4", "res5"), mm_features, strict=True):
        assert torch.equal(feature, expected[name]), name
        # bit for bit: without autograd detectron2's FrozenBN runs the same batch_norm op as BN in eval mode
        assert torch.equal(d2_features[name], feature), name


# ---------------------------------------------------------------------------------------------- entry point


def _tool_main():
    from tools.train_mmdet import main

    return main


# COCO's 80 category ids: 1..90 with these gaps
COCO_IDS = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]


@pytest.fixture
def coco_layout(tmp_path):
    """A tiny COCO 2017 tree under tmp/coco, in the real files' format: the synthetic shapes (ids 1, 3, 7, 11),
    with the 80 COCO categories listed as instances_*2017.json list them (1 person, 3 car, 7 train, ...)."""
    from mmdet.datasets import CocoDataset

    from detection.synthetic import make_synthetic_coco

    names = CocoDataset.METAINFO["classes"]
    categories = [{"id": i, "name": n, "supercategory": "x"} for i, n in zip(COCO_IDS, names, strict=True)]
    paths = make_synthetic_coco(tmp_path / "synthetic", num_train=4, num_val=2, image_size=96, seed=1)
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        data = json.loads(paths[f"{split}_json"].read_text())
        data["categories"] = categories
        (coco / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))
        paths[f"{split}_images"].rename(coco / f"{split}2017")
    return tmp_path


def test_table7_config_trains_and_evaluates_on_the_coco_layout(coco_layout, imagenet_checkpoint, monkeypatch):
    """The SE-R50 COCO config end to end through the tool: COCO files where Detectron2 keeps them, ImageNet
    weights through init_cfg, one epoch, COCO evaluation, metrics.json. Only sizes are shrunk."""
    monkeypatch.setenv("DETECTRON2_DATASETS", str(coco_layout))
    work_dir = coco_layout / "run"
    options = [
        f"model.backbone.init_cfg.checkpoint={imagenet_checkpoint[0]}",
        "model.backbone.stage_blocks=(1,1,1,1)",
        "train_cfg.max_epochs=1",
        "train_dataloader.num_workers=0",
        "train_dataloader.persistent_workers=False",
        "train_dataloader.dataset.pipeline.2.scale=(128,128)",
        "val_dataloader.num_workers=0",
        "val_dataloader.persistent_workers=False",
        "val_dataloader.dataset.pipeline.1.scale=(128,128)",
        "model.test_cfg.rcnn.score_thr=0.0",  # an untrained detector scores below the default 0.05
    ]
    config = str(CONFIGS / "faster-rcnn_se-r50_fpn_2x_coco.py")
    metrics = _tool_main()([config, "--work-dir", str(work_dir), "--cfg-options", *options])
    assert set(metrics) >= {"coco/bbox_mAP", "coco/bbox_mAP_50", "coco/bbox_mAP_75", "coco/bbox_mAP_s"}
    assert json.loads((work_dir / "metrics.json").read_text()) == metrics
    assert (work_dir / "epoch_1.pth").is_file()


def test_missing_coco_is_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    main = _tool_main()
    with pytest.raises(SystemExit) as exc:
        mmdet_runner.main_guard(main, [str(CONFIGS / "faster-rcnn_se-r50_fpn_2x_coco.py"), "--work-dir", str(tmp_path)])
    message = str(exc.value.code)
    assert message.startswith("error: dataset files missing")
    assert f"{tmp_path}/coco/annotations/instances_train2017.json" in message and "train2017/" in message


@pytest.mark.parametrize("resume", [["--resume"], ["--resume", "output/mmdet/run/iter_8.pth"]])
def test_resume_with_checkpoint_is_refused(resume, capsys):
    from tools.train_mmdet import parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args([str(SMOKE), *resume, "--checkpoint", "other.pth"])
    assert exc.value.code == 2
    assert "--resume and --checkpoint name two starting points" in capsys.readouterr().err


def test_launcher_pytorch_outside_torchrun_is_refused(monkeypatch, capsys):
    from tools.train_mmdet import parse_args

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exc:
        parse_args([str(SMOKE), "--launcher", "pytorch"])
    assert exc.value.code == 2
    assert "--launcher pytorch runs in processes started by torchrun" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    monkeypatch.setenv("LOCAL_RANK", "0")  # parse_args sets it when unset: undone after the test
    assert parse_args([str(SMOKE), "--launcher", "pytorch"]).launcher == "pytorch"


@pytest.mark.parametrize(
    ("blocked", "expected"),
    [
        ("mmengine", "mmengine is not installed"),
        ("mmcv", "mmcv is not installed"),
        ("mmcv.ops", "has no usable compiled ops"),
        ("mmdet", "mmdet is not installed"),
    ],
)
def test_unusable_mmcv_is_one_clear_message(blocked, expected, monkeypatch):
    monkeypatch.setitem(sys.modules, blocked, None)  # makes `import blocked` raise ImportError
    with pytest.raises(SystemExit) as exc:
        mmdet_runner.main_guard(_tool_main(), [str(SMOKE)])
    message = str(exc.value.code)
    assert expected in message and "uv sync --extra mmdet" in message and "--no-build-isolation mmcv==2.1.0" in message


def test_mmcv_version_mmdet_refuses(monkeypatch):
    import mmcv

    monkeypatch.setattr(mmcv, "__version__", "2.2.0")
    monkeypatch.delitem(sys.modules, "mmdet")  # re-runs mmdet/__init__.py's version assertion only
    with pytest.raises(mmdet_runner.MMDetUnavailable, match=r"mmdet refuses.*mmcv>=2.0.0rc4, <2.2.0.*uv sync"):
        mmdet_runner.check_mmdet()


# ---------------------------------------------------------------------------------------------- training


def _depth18() -> dict:
    """cfg_options turning the smoke config's SE-ResNet-50 into an SE-ResNet-18, for the test budget."""
    return {"model.backbone.depth": 18, "model.neck.in_channels": [64, 128, 256, 512]}


def test_smoke_config_uses_the_shared_synthetic_dataset(monkeypatch):
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    cfg = mmdet_runner.load_config(SMOKE)
    assert tuple(cfg.metainfo.classes) == SYNTHETIC_CLASSES
    assert cfg.synthetic_data.root == cfg.train_dataloader.dataset.data_root == "datasets/synthetic_coco/"
    assert cfg.model.backbone.type == "SEResNet" and cfg.model.backbone.depth == 50 and cfg.model.backbone.se
    assert cfg.model.roi_head.bbox_head.num_classes == len(SYNTHETIC_CLASSES)
    assert cfg.val_evaluator.type == "CocoMetric" and cfg.val_evaluator.metric == "bbox"
    assert cfg.val_evaluator.ann_file == "datasets/synthetic_coco/annotations/instances_synthetic_val.json"


def test_both_engines_smoke_on_the_same_files():
    cfg = mmdet_runner.load_config(SMOKE)
    assert {k: v for k, v in cfg.synthetic_data.items() if k != "root"} == SMOKE_OPTIONS


class _Crash(RuntimeError):
    pass


class _Iterations(Hook):
    """Records the iterations a run executes (1-based) and the stem weights its first iteration starts from;
    raises _Crash after iteration `crash_after`, as a killed job would stop."""

    def __init__(self, crash_after: int | None = None):
        self.crash_after, self.done, self.start_weights = crash_after, [], None

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        if self.start_weights is None:
            self.start_weights = runner.model.backbone.conv1.weight.detach().clone()

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.done.append(runner.iter + 1)
        if runner.iter + 1 == self.crash_after:
            raise _Crash(f"simulated crash after iteration {self.crash_after}")


def four_iterations() -> dict:
    """--cfg-options of a tiny 4-iteration run that checkpoints every 2 iterations and never validates."""
    return {
        **_depth18(),
        "model.backbone.stage_blocks": TINY,
        "synthetic_data.num_train": 8,
        "synthetic_data.num_val": 2,
        "train_cfg.max_iters": 4,
        "train_dataloader.batch_size": 2,
        "default_hooks.checkpoint.interval": 2,
        "val_dataloader": None,
        "val_cfg": None,
        "val_evaluator": None,
    }


def test_interrupted_training_resumes_from_the_last_checkpoint(tmp_path, monkeypatch):
    """A run killed after iteration 3 resumes from iter_2.pth (last_checkpoint) and runs only iterations 3-4."""
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "data"))
    options = four_iterations()

    def run(resume: bool, crash_after: int | None = None) -> tuple[_Iterations, object]:
        cfg = mmdet_runner.load_config(SMOKE, work_dir=str(tmp_path / "run"), cfg_options=options, resume=resume)
        cfg.experiment_name = f"resume_{resume}"
        mmdet_runner.prepare_data(cfg)
        runner, _ = mmdet_runner.build_runner(cfg)
        record = _Iterations(crash_after)
        runner.register_hook(record, priority="LOWEST")
        runner.train()
        return record, runner

    with pytest.raises(_Crash):
        run(resume=False, crash_after=3)
    assert (tmp_path / "run" / "last_checkpoint").read_text().endswith("iter_2.pth")
    assert not (tmp_path / "run" / "iter_4.pth").exists()

    record, runner = run(resume=True)
    assert record.done == [3, 4] and runner.iter == 4
    # it started from iter_2.pth, read weights-only (mmengine's torch.load through our allow-list)
    saved = torch.load(tmp_path / "run" / "iter_2.pth", weights_only=True)["state_dict"]
    assert torch.equal(record.start_weights, saved["backbone.conv1.weight"])
    assert (tmp_path / "run" / "iter_4.pth").is_file()


@pytest.mark.slow
def test_smoke_training_reaches_nontrivial_ap(tmp_path, monkeypatch):
    """The smoke config with an SE-ResNet-18 trains from scratch to a clearly non-trivial COCO AP."""
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "data"))
    iters = SMOKE_TEST_ITERS
    options = {
        **_depth18(),
        "train_cfg.max_iters": iters,
        "train_cfg.val_interval": iters,
        "param_scheduler.1.end": iters,
        "param_scheduler.1.milestones": [int(iters * 0.75), int(iters * 0.92)],
        "default_hooks.checkpoint.interval": iters,
    }
    cfg = mmdet_runner.load_config(SMOKE, work_dir=str(tmp_path / "run"), cfg_options=options)
    cfg.experiment_name = "smoke"
    metrics = mmdet_runner.run(cfg)
    print(f"synthetic smoke: {metrics}")
    assert metrics["coco/bbox_mAP_50"] > SMOKE_MIN_AP50 and metrics["coco/bbox_mAP"] > SMOKE_MIN_AP
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == metrics
    assert (tmp_path / "run" / f"iter_{iters}.pth").is_file()


# ---------------------------------------------------------------------------------------------- reliability


def test_killed_save_leaves_the_last_checkpoint_and_the_next_run_removes_its_temp_file(tmp_path, monkeypatch):
    """A save killed half-way through iter_4.pth: no truncated iter_4.pth under its final name (MMEngine writes in
    place), last_checkpoint still names iter_2.pth; the temporary file a kill -9 would leave goes at the next run."""
    from mmengine.fileio.backends.local_backend import LocalBackend

    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "data"))
    work_dir = tmp_path / "run"
    options = four_iterations()
    put = LocalBackend.put

    def killed_at_iter_4(self, obj, filepath):
        if "iter_4" in str(filepath):
            Path(filepath).write_bytes(obj[: len(obj) // 2])
            raise _Crash("killed mid-save")
        return put(self, obj, filepath)

    monkeypatch.setattr(LocalBackend, "put", killed_at_iter_4)
    cfg = mmdet_runner.load_config(SMOKE, work_dir=str(work_dir), cfg_options=options)
    cfg.experiment_name = "killed"
    with pytest.raises(_Crash):
        mmdet_runner.run(cfg)
    assert not (work_dir / "iter_4.pth").exists()
    assert (work_dir / "last_checkpoint").read_text().endswith("iter_2.pth")
    assert not list(work_dir.glob(".*.tmp"))

    monkeypatch.setattr(LocalBackend, "put", put)
    stale = work_dir / ".iter_4.pth.0123456789ab.tmp"  # what a kill -9 leaves: no exception handler ran
    stale.write_bytes(b"half a checkpoint")
    os.utime(stale, (1e9, 1e9))
    cfg = mmdet_runner.load_config(SMOKE, work_dir=str(work_dir), cfg_options=options, resume=True)
    cfg.experiment_name = "resumed"
    mmdet_runner.run(cfg)
    assert not stale.exists()
    assert torch.load(work_dir / "iter_4.pth", weights_only=True)["meta"]["iter"] == 4


@pytest.mark.parametrize("option", ["--resume", "--checkpoint"])
@pytest.mark.parametrize("kind", ["missing", "truncated", "untrusted"])
def test_bad_start_checkpoint_is_one_clear_line(option, kind, tmp_path):
    path = tmp_path / "iter_8.pth"
    if kind == "truncated":
        torch.save({"state_dict": {"w": torch.zeros(1000)}}, path)
        path.write_bytes(path.read_bytes()[:-200])
    elif kind == "untrusted":
        torch.save({"state_dict": {}, "payload": _Crash("runs code on load")}, path)
    argv = [str(SMOKE), "--work-dir", str(tmp_path / "run"), option, str(path)]
    with pytest.raises(SystemExit) as exc:
        mmdet_runner.main_guard(_tool_main(), argv)
    message = str(exc.value.code)
    assert message.startswith(f"error: {option} {path}") and "\n" not in message.strip(), message
    assert {"missing": "no such", "truncated": "truncated", "untrusted": "code"}[kind] in message, message
    assert not (tmp_path / "run").exists()  # refused before anything was built


def test_init_cfg_errors_name_the_config_key(tmp_path):
    absent = tmp_path / "absent.pth"
    with pytest.raises(CheckpointError, match=rf"^model\.backbone\.init_cfg: {absent}: no such checkpoint"):
        SEResNet(50, stage_blocks=TINY, init_cfg=dict(type="Pretrained", checkpoint=str(absent))).init_weights()


@pytest.mark.parametrize("content", ["", "/gone/iter_6.pth"])
def test_a_cut_short_last_checkpoint_names_the_newest_checkpoint(tmp_path, content):
    """Issue 14, item 9: MMEngine rewrites last_checkpoint in place; a kill then leaves it empty or naming nothing,
    and the next run points it at the newest (whole) checkpoint instead of failing to resume."""
    for name in ("iter_2.pth", "iter_10.pth", "iter_4.pth", "best_coco.pth"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "last_checkpoint").write_text(content)
    assert mmdet_runner.repair_last_checkpoint(tmp_path) == tmp_path / "iter_10.pth"
    assert (tmp_path / "last_checkpoint").read_text() == str(tmp_path / "iter_10.pth")
    assert mmdet_runner.repair_last_checkpoint(tmp_path) is None  # a pointer that names a file is left alone
