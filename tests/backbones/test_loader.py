"""The ImageNet checkpoint loader: peer checkpoints give the peer's outputs, bad files change nothing."""

from __future__ import annotations

import argparse
import functools
import http.server
import io
import json
import os
import pickle
import threading
import zipfile
from pathlib import Path

import pytest
import timm  # dev dependency: builds the reference models of timm and of Cadene's layout (timm legacy_*)
import torch
import torchvision
from torch import nn

import backbones
from backbones import CheckpointError, UntrustedCheckpointError, create_model, create_pretrained, load_pretrained
from backbones.checkpoints.export import DETECTRON2_PREFIX, save_checkpoint, save_detectron2, to_detectron2

TINY = (1, 1, 1, 1)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random values for what initialises to constants (BN affine and statistics, biases), so every tensor
    shapes the output; conv and linear weights are random from their init already."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point() or t.ndim > 1:
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif name.endswith("weight"):  # BN scale
                t.copy_(torch.rand(t.shape, generator=gen) * 0.5 + 0.5)
            else:  # BN shift and running mean, conv and linear biases
                t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
    return model.eval()


def max_diff(ref: nn.Module, ours: nn.Module) -> float:
    """Largest |logit difference| on one 40x40 image (small: these tests run many ResNet-50-wide nets)."""
    x = torch.randn(1, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    ref.eval(), ours.eval()
    with torch.no_grad():
        a, b = ref(x), ours(x)
    assert a.shape == b.shape
    assert 1e-2 < a.abs().max() < 1e3  # outputs that carry signal, at a scale where 1e-5 is float32 noise
    return (a - b).abs().max().item()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed by a failed load"


@pytest.fixture(scope="module")
def timm_se50():
    """timm seresnet50 (one block per stage) with random weights: our se_resnet50 names, PyTorch geometry."""
    return randomize(timm.create_model("seresnet50", layers=TINY))


# ------------------------------------------------------------------------------ timm seresnet, native wrappers


def _plain(ref, tmp):
    torch.save(ref.state_dict(), tmp / "w.pth")
    return tmp / "w.pth", ""


def _safetensors(ref, tmp):
    from safetensors.torch import save_file

    save_file(ref.state_dict(), tmp / "model.safetensors")
    return tmp / "model.safetensors", ""


def _data_parallel(ref, tmp):
    torch.save(nn.DataParallel(ref).state_dict(), tmp / "ddp.pth")
    return tmp / "ddp.pth", "module."


def _compiled(ref, tmp):
    # what torch.compile(ref).state_dict() holds (building the real wrapper costs seconds of dynamo import)
    torch.save({f"_orig_mod.{k}": v for k, v in ref.state_dict().items()}, tmp / "compiled.pth")
    return tmp / "compiled.pth", "_orig_mod."


def _lightning_compiled(ref, tmp):
    weights = {f"model._orig_mod.{k}": v for k, v in ref.state_dict().items()}
    ckpt = {"state_dict": weights, "epoch": 3, "hyper_parameters": {"lr": 0.1, "arch": "seresnet50"}}
    torch.save(ckpt, tmp / "last.ckpt")
    return tmp / "last.ckpt", "state_dict.model."  # the inner _orig_mod. is dropped


def _timm_train(ref, tmp):
    """timm's own training checkpoint: CheckpointSaver with argparse args and an EMA copy."""
    from timm.utils import CheckpointSaver, ModelEmaV3

    ema = ModelEmaV3(ref)
    with torch.no_grad():
        for p in ema.module.parameters():
            p.mul_(0.5)
    optimizer = torch.optim.SGD(ref.parameters(), lr=0.1)
    saver = CheckpointSaver(ref, optimizer, args=argparse.Namespace(model="seresnet50", lr=0.1), model_ema=ema)
    saver._save(str(tmp / "checkpoint-0.pth.tar"), epoch=0, metric=1.0)
    return tmp / "checkpoint-0.pth.tar", "state_dict."


@pytest.mark.parametrize(
    "write",
    [_plain, _safetensors, _data_parallel, _compiled, _lightning_compiled, _timm_train],
    ids=lambda f: f.__name__,
)
def test_timm_seresnet_in_every_wrapper_gives_timm_outputs(timm_se50, tmp_path, write):
    path, prefix = write(timm_se50, tmp_path)
    ours = create_model("se_resnet50", layers=TINY)
    report = load_pretrained(ours, path)
    assert (report.format, report.prefix, report.ema) == ("timm", prefix, False)
    assert not report.missing and not report.unexpected and report.classifier_dropped is None
    assert max_diff(timm_se50, ours) < 1e-5


def test_ema_weights_are_chosen_on_request(timm_se50, tmp_path):
    path, _ = _timm_train(timm_se50, tmp_path)
    raw, ema = create_model("se_resnet50", layers=TINY), create_model("se_resnet50", layers=TINY)
    assert not load_pretrained(raw, path).ema
    report = load_pretrained(ema, path, ema=True)
    assert (report.ema, report.prefix) == (True, "state_dict_ema.")
    assert torch.equal(ema.conv1.weight, timm_se50.conv1.weight * 0.5)
    assert torch.equal(raw.conv1.weight, timm_se50.conv1.weight)
    # a file with only an EMA copy (with the `module.` and n_averaged of torch's AveragedModel) loads that
    averaged = torch.optim.swa_utils.AveragedModel(timm_se50)
    torch.save({"model_ema": averaged.state_dict(), "epoch": 1}, tmp_path / "ema_only.pth")
    only = create_model("se_resnet50", layers=TINY)
    report = load_pretrained(only, tmp_path / "ema_only.pth")
    assert (report.ema, report.prefix) == (True, "model_ema.module.")
    assert max_diff(timm_se50, only) < 1e-5
    # ema=True on a file without EMA weights is an error naming the file
    _plain(timm_se50, tmp_path)
    with pytest.raises(CheckpointError, match=r"w\.pth.*no EMA weights"):
        load_pretrained(create_model("se_resnet50", layers=TINY), tmp_path / "w.pth", ema=True)


def test_real_lightning_checkpoint_loads_with_weights_only(tmp_path):
    lightning = pytest.importorskip("lightning")

    class Classifier(lightning.LightningModule):
        def __init__(self, arch: str = "resnet18", lr: float = 0.1, layers: tuple = TINY):
            super().__init__()
            self.save_hyperparameters()
            self.model = create_model(arch, layers=layers, num_classes=10)

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    data = torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    module = Classifier()
    trainer = lightning.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    trainer.save_checkpoint(tmp_path / "trained.ckpt")
    assert "hyper_parameters" in torch.load(tmp_path / "trained.ckpt", weights_only=True)

    ours = create_model("resnet18", layers=TINY, num_classes=10)
    report = load_pretrained(ours, tmp_path / "trained.ckpt")
    assert (report.prefix, report.format, report.missing) == ("state_dict.model.", "torchvision", [])
    for k, v in module.model.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k


def test_timm_se_width_rounding_is_named_and_adapted(tmp_path):
    """timm rounds SE widths to multiples of 8: se_resnet18's 64/16 = 4 becomes 8."""
    ref = randomize(timm.create_model("seresnet18"))
    torch.save(ref.state_dict(), tmp_path / "seresnet18.pth")
    ours = create_model("se_resnet18")
    before = snapshot(ours)
    with pytest.raises(CheckpointError, match="se_divisor=8") as err:
        load_pretrained(ours, tmp_path / "seresnet18.pth")
    assert "layer1.0.se.fc1.weight: checkpoint (8, 64, 1, 1) vs model (4, 64, 1, 1)" in str(err.value)
    assert "seresnet18.pth" in str(err.value)
    assert_unchanged(ours, before)
    adapted = create_pretrained("se_resnet18", tmp_path / "seresnet18.pth")
    assert adapted.layer1[0].se.fc1.out_channels == 8
    assert max_diff(ref, adapted) < 1e-5


@pytest.mark.parametrize("arch, kwargs", [("resnet50", {}), ("resnext50_32x4d", {"groups": 32, "width_per_group": 4})])
def test_torchvision_resnets_give_torchvision_outputs(tmp_path, arch, kwargs):
    tv = torchvision.models.resnet
    ref = randomize(
        tv.ResNet(tv.Bottleneck, list(TINY), **kwargs)
    )  # what torchvision.models.<arch>() builds, shallower
    torch.save(ref.state_dict(), tmp_path / f"{arch}.pth")
    ours = create_model(arch, layers=TINY)
    report = load_pretrained(ours, tmp_path / f"{arch}.pth")
    assert report.format == "torchvision" and len(report.loaded) == len(ref.state_dict())
    assert max_diff(ref, ours) < 1e-5


# ------------------------------------------------------------------------ Cadene / timm legacy (Caffe release)

CADENE_CASES = {
    # timm legacy model and kwargs, our model and its size, the options that fit, the fix a refusal must name
    "seresnet50": ("legacy_seresnet50", TINY, "se_resnet50", {"style": "caffe"}, "style='caffe'"),
    "seresnext26": (
        "legacy_seresnext26_32x4d",
        None,
        "se_resnext50_32x4d",
        {"stem_pool_ceil": True},
        "stem_pool_ceil=True",
    ),
    "senet154": ("legacy_senet154", TINY, "senet154", {}, None),
}


def legacy_model(name: str, layers=None) -> nn.Module:
    return randomize(timm.create_model(name, **({"layers": list(layers)} if layers else {})))


@pytest.mark.parametrize("case", list(CADENE_CASES))
def test_cadene_legacy_weights_need_and_get_caffe_geometry(tmp_path, case):
    legacy, layers, arch, fitting, fix = CADENE_CASES[case]
    ref = legacy_model(legacy, layers)
    sd = ref.state_dict()
    assert "layer0.conv1.weight" in sd and "last_linear.weight" in sd
    assert any(".se_module.fc1.weight" in k for k in sd)
    path = tmp_path / f"{legacy}.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=False)  # Cadene's files predate the zip format
    geometry = {"layers": layers or (2, 2, 2, 2)}
    if fix is not None:  # the registry's PyTorch geometry is refused, naming the option, and nothing changes
        wrong = create_model(arch, **geometry)
        before = snapshot(wrong)
        with pytest.raises(CheckpointError, match=fix.replace("(", r"\(")) as err:
            load_pretrained(wrong, path)
        assert str(path) in str(err.value)
        assert_unchanged(wrong, before)
        right = create_model(arch, **geometry, **fitting)
        report = load_pretrained(right, path)
        assert report.format == "cadene" and len(report.loaded) == len(sd)
        assert max_diff(ref, right) < 1e-5
    adapted = create_pretrained(arch, path, **geometry)  # configured from the checkpoint
    assert max_diff(ref, adapted) < 1e-5


def test_legacy_basic_block_weights_are_refused_not_loaded_wrong():
    """timm legacy_seresnet18/34 put a ReLU before the SE: no option of ours computes that, so refuse."""
    ref = legacy_model("legacy_seresnet18")
    for kwargs in ({}, {"stem_pool_ceil": True}):
        ours = create_model("se_resnet18", **kwargs)
        before = snapshot(ours)
        with pytest.raises(CheckpointError, match="ReLU before its SE"):
            load_pretrained(ours, ref.state_dict())
        assert_unchanged(ours, before)


# ------------------------------------------------- mmpretrain and moskomule: not installable, layouts written out


def mmpretrain_layout(sd: dict, old: bool = False) -> dict:
    """formats.md: backbone.<torchvision name>, SE se_layer.conv1.conv / conv2.conv (older: conv1 / conv2), head.fc."""
    se1, se2 = ("se_layer.conv1.", "se_layer.conv2.") if old else ("se_layer.conv1.conv.", "se_layer.conv2.conv.")
    out = {}
    for key, value in sd.items():
        if key.startswith("fc."):
            out[f"head.{key}"] = value
        else:
            out["backbone." + key.replace("se.fc1.", se1).replace("se.fc2.", se2)] = value
    return out


@pytest.mark.parametrize("old", [False, True], ids=["mmpretrain", "mmcls-old-se"])
def test_mmpretrain_layout_lands_every_tensor(timm_se50, tmp_path, old):
    layout = mmpretrain_layout(timm_se50.state_dict(), old)
    se = "se_layer.conv1." if old else "se_layer.conv1.conv."
    assert layout[f"backbone.layer1.0.{se}weight"].shape == (16, 256, 1, 1)
    assert {"backbone.conv1.weight", "backbone.bn1.running_var", "head.fc.weight"} <= layout.keys()
    meta = {"mmengine_version": "0.10.4", "epoch": 100, "dataset_meta": {"classes": ["a", "b"]}}
    torch.save({"meta": meta, "state_dict": layout}, tmp_path / "seresnet50_mm.pth")
    ours = create_model("se_resnet50", layers=TINY)
    report = load_pretrained(ours, tmp_path / "seresnet50_mm.pth")
    assert (report.format, report.prefix, len(report.loaded)) == ("mmpretrain", "state_dict.", len(layout))
    mine = ours.state_dict()
    for key, value in timm_se50.state_dict().items():  # every tensor where formats.md puts it
        assert torch.equal(mine[key], value), key
    assert max_diff(timm_se50, ours) < 1e-5


class MoskomuleSELayer(nn.Module):
    """moskomule/senet.pytorch senet/se_module.py: Linear-form SE, no bias since late 2018."""

    def __init__(self, channel: int, reduction: int = 16, bias: bool = False):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channel, channel // reduction, bias=bias),
            nn.ReLU(inplace=True),
            nn.Linear(channel // reduction, channel, bias=bias),
            nn.Sigmoid(),
        )

    def forward(self, x):
        b, c, _, _ = x.size()
        y = self.fc(self.avg_pool(x).view(b, c)).view(b, c, 1, 1)
        return x * y.expand_as(x)


def moskomule_se_resnet50(layers, bias: bool = False) -> nn.Module:
    """moskomule's se_resnet50: torchvision's ResNet with SE after bn3 of each bottleneck."""
    tv = torchvision.models.resnet

    class SEBottleneck(tv.Bottleneck):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.se = MoskomuleSELayer(self.conv3.out_channels, 16, bias)

        def forward(self, x):
            residual = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.se(self.bn3(self.conv3(out)))
            return self.relu(out + residual)

    return tv.ResNet(SEBottleneck, list(layers))


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "pre-2019-bias"])
def test_moskomule_linear_se_gives_moskomule_outputs(tmp_path, bias):
    ref = randomize(moskomule_se_resnet50(TINY, bias))
    sd = ref.state_dict()
    assert sd["layer1.0.se.fc.0.weight"].shape == (16, 256) and ("layer1.0.se.fc.0.bias" in sd) == bias
    torch.save(sd, tmp_path / "seresnet50-moskomule.pkl")
    path = tmp_path / "seresnet50-moskomule.pkl"
    if not bias:
        wrong = create_model("se_resnet50", layers=TINY)
        before = snapshot(wrong)
        with pytest.raises(CheckpointError, match="se_bias=False"):
            load_pretrained(wrong, path)
        assert_unchanged(wrong, before)
    ours = create_model("se_resnet50", layers=TINY, se_bias=bias)
    assert load_pretrained(ours, path).format == "moskomule"
    assert torch.equal(ours.layer1[0].se.fc1.weight[:, :, 0, 0], sd["layer1.0.se.fc.0.weight"])
    assert max_diff(ref, ours) < 1e-5
    if not bias:  # create_pretrained sees the missing bias and builds se_bias=False
        assert max_diff(ref, create_pretrained("se_resnet50", path, layers=TINY)) < 1e-5


# -------------------------------------------------------------------------------------------------- classifier


def test_classifier_kept_when_it_fits_dropped_when_not(timm_se50):
    sd = timm_se50.state_dict()
    fits = create_model("se_resnet50", layers=TINY)
    assert load_pretrained(fits, sd).classifier_dropped is None
    assert torch.equal(fits.fc.weight, sd["fc.weight"])

    other = create_model("se_resnet50", layers=TINY, num_classes=365)
    head = other.fc.weight.clone()
    report = load_pretrained(other, sd)
    assert "1000 classes, the model 365" in report.classifier_dropped
    assert torch.equal(other.fc.weight, head) and torch.equal(other.conv1.weight, sd["conv1.weight"])

    headless = create_model("se_resnet50", layers=TINY, num_classes=0)
    report = load_pretrained(headless, sd)
    assert "no classifier" in report.classifier_dropped and not report.unexpected

    no_head_in_file = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    report = load_pretrained(create_model("se_resnet50", layers=TINY), no_head_in_file)
    assert report.missing == ["fc.weight", "fc.bias"]

    # a kept head must be whole: a file's fc.weight without its fc.bias leaves the bias at init, so it is missing
    half_head = {k: v for k, v in sd.items() if k != "fc.bias"}
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint \(1\): fc\.bias"):
        load_pretrained(create_model("se_resnet50", layers=TINY), half_head)
    assert load_pretrained(create_model("se_resnet50", layers=TINY), half_head, strict=False).missing == ["fc.bias"]


# ------------------------------------------------------------------------------------------------------ safety


class _CreatesFile:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("container", ["torch-zip", "plain-pickle"])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, container):
    marker = tmp_path / "pwned"
    payload = {"conv1.weight": torch.zeros(1), "exploit": _CreatesFile(marker)}
    path = tmp_path / ("evil.pth" if container == "torch-zip" else "evil.pkl")
    if container == "torch-zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps({"model": {}, "__author__": "x", "exploit": _CreatesFile(marker)}))
    model = create_model("resnet18", layers=TINY)
    before = snapshot(model)
    with pytest.raises(UntrustedCheckpointError, match="trusted=True") as err:
        load_pretrained(model, path)
    assert str(path) in str(err.value) and "open" in str(err.value)
    assert not marker.exists()
    assert_unchanged(model, before)


class Meta:
    """A harmless custom class some trainers pickle beside the weights."""

    def __init__(self, note):
        self.note = note


def test_trusted_opens_a_pickle_with_custom_objects(tmp_path):
    model = create_model("resnet18", layers=TINY)
    torch.save(
        {"state_dict": randomize(create_model("resnet18", layers=TINY)).state_dict(), "meta": Meta("x")},
        tmp_path / "c.pth",
    )
    with pytest.raises(UntrustedCheckpointError, match="Meta"):
        load_pretrained(model, tmp_path / "c.pth")
    assert load_pretrained(model, tmp_path / "c.pth", trusted=True).prefix == "state_dict."


def as_cuda_saved(cpu_file: Path, out: Path) -> Path:
    """Rewrite the storage location tags of a CPU-saved torch zip to 'cuda:0', as a GPU machine writes them."""
    src = zipfile.ZipFile(cpu_file)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert b"X\x03\x00\x00\x00cpu" in data
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            dst.writestr(info, data)
    out.write_bytes(buf.getvalue())
    return out


def test_cuda_saved_checkpoint_loads_on_cpu(tmp_path):
    ref = randomize(create_model("resnet18", layers=TINY))
    torch.save(ref.state_dict(), tmp_path / "cpu.pth")
    path = as_cuda_saved(tmp_path / "cpu.pth", tmp_path / "cuda.pth")
    if torch.cuda.is_available():  # the fixture really claims CUDA storages
        assert torch.load(path, weights_only=True)["conv1.weight"].is_cuda
    else:
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)
    ours = create_model("resnet18", layers=TINY)
    load_pretrained(ours, path)
    assert max_diff(ref, ours) == 0


def test_legacy_torch_file_is_recognised_whatever_its_pickle_protocol(tmp_path):
    """torch.save(..., _use_new_zipfile_serialization=False) opens with its pickled magic number, framed from
    protocol 4 on (which torch's weights-only unpickler cannot read: only trusted=True opens it)."""
    ref = randomize(create_model("resnet18", layers=TINY))
    for protocol in (2, 4):
        path = tmp_path / f"legacy{protocol}.pth"
        torch.save(ref.state_dict(), path, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
        ours = create_model("resnet18", layers=TINY)
        report = load_pretrained(ours, path, trusted=protocol > 2)
        assert report.file_format == "torch" and max_diff(ref, ours) == 0
    # no global is to blame: the error gives torch's own reason, not "needs code (unknown globals)"
    with (
        pytest.warns(UserWarning, match="pickle protocol 4"),
        pytest.raises(UntrustedCheckpointError, match=r"cannot read it \(Unsupported operand \d+\)") as err,
    ):
        load_pretrained(create_model("resnet18", layers=TINY), tmp_path / "legacy4.pth")
    assert "globals" not in str(err.value)


# -------------------------------------------------------------------------------------------------- bad input


def _truncated_zip(tmp: Path) -> Path:
    torch.save(create_model("resnet18", layers=TINY).state_dict(), tmp / "full.pth")
    data = (tmp / "full.pth").read_bytes()
    (tmp / "bad.pth").write_bytes(data[: len(data) // 2])
    return tmp / "bad.pth"


def _truncated_safetensors(tmp: Path) -> Path:
    from safetensors.torch import save_file

    save_file({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp / "full.safetensors")
    data = (tmp / "full.safetensors").read_bytes()
    (tmp / "bad.safetensors").write_bytes(data[:200])
    return tmp / "bad.safetensors"


def _written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


BAD_FILES = {
    "empty": (lambda t: _written(t / "bad.pth", b""), "empty"),
    "truncated-zip": (_truncated_zip, "truncated or corrupt"),
    "truncated-safetensors": (_truncated_safetensors, "truncated or corrupt"),
    "garbage": (lambda t: _written(t / "bad.bin", b"\x00\x13 not a model " * 4), "not a checkpoint"),
    "json": (lambda t: _written(t / "bad.pth", b'{"a": 1}'), "not a checkpoint"),
    "tensor": (lambda t: torch.save(torch.zeros(3), t / "bad.pth") or t / "bad.pth", "expected a state dict"),
    "other-net": (
        lambda t: torch.save({"encoder.weight": torch.zeros(3)}, t / "bad.pth") or t / "bad.pth",
        "no weights",
    ),
    "missing": (lambda t: t / "nowhere.pth", "no such checkpoint file"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_give_an_error_naming_the_file(tmp_path, case):
    make, message = BAD_FILES[case]
    path = make(tmp_path)
    model = create_model("resnet18", layers=TINY)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=message) as err:
        load_pretrained(model, path)
    assert str(path) in str(err.value)
    assert_unchanged(model, before)


def test_failed_load_leaves_every_tensor_unchanged(tmp_path):
    plain = randomize(create_model("resnet50", layers=TINY)).state_dict()
    torch.save(plain, tmp_path / "resnet50.pth")
    se_model = create_model("se_resnet50", layers=TINY)
    before = snapshot(se_model)
    with pytest.raises(CheckpointError, match="no SE blocks") as err:  # strict: the SE blocks would stay random
        load_pretrained(se_model, tmp_path / "resnet50.pth")
    assert "layer1.0.se.fc1.weight" in str(err.value)
    assert_unchanged(se_model, before)
    # a single wrong shape among valid ones (checked last in file order) still loads nothing
    bad = dict(plain, **{"layer4.0.conv3.weight": torch.zeros(2048, 512, 3, 3)})
    torch.save(bad, tmp_path / "bad.pth")
    model = create_model("resnet50", layers=TINY)
    before = snapshot(model)
    with pytest.raises(
        CheckpointError, match=r"layer4\.0\.conv3\.weight: checkpoint \(2048, 512, 3, 3\) vs model \(2048, 512, 1, 1\)"
    ):
        load_pretrained(model, tmp_path / "bad.pth")
    assert_unchanged(model, before)
    # a tensor that cannot be copied into the model (here a meta tensor, last in file order) loads nothing either
    model = create_model("resnet50", layers=TINY)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"fc\.bias .*meta.*nothing was loaded"):
        load_pretrained(model, dict(plain, **{"fc.bias": torch.empty(1000, device="meta")}))
    assert_unchanged(model, before)
    # strict=False takes what fits and reports the rest
    report = load_pretrained(se_model, tmp_path / "resnet50.pth", strict=False)
    assert report.missing and all(".se." in k for k in report.missing)
    assert torch.equal(se_model.conv1.weight, plain["conv1.weight"])


def test_ambiguous_checkpoint_asks_for_a_prefix(tmp_path):
    a = randomize(create_model("resnet18", layers=TINY), seed=1).state_dict()
    b = randomize(create_model("resnet18", layers=TINY), seed=2).state_dict()
    torch.save({"student": a, "teacher": b}, tmp_path / "kd.pth")
    model = create_model("resnet18", layers=TINY)
    with pytest.raises(CheckpointError, match="'student.', 'teacher.'"):
        load_pretrained(model, tmp_path / "kd.pth")
    load_pretrained(model, tmp_path / "kd.pth", prefix="teacher.")
    assert torch.equal(model.conv1.weight, b["conv1.weight"])
    # the trailing dot is optional: "student" means the subtree, as the error's "'student.'" does
    assert load_pretrained(model, tmp_path / "kd.pth", prefix="student").prefix == "student."
    assert torch.equal(model.conv1.weight, a["conv1.weight"])


def test_keys_that_collide_once_orig_mod_is_dropped_are_refused(tmp_path):
    a = randomize(create_model("resnet18", layers=TINY), seed=1).state_dict()
    b = randomize(create_model("resnet18", layers=TINY), seed=2).state_dict()
    both = {**{f"model._orig_mod.{k}": v for k, v in a.items()}, **{f"model.{k}": v for k, v in b.items()}}
    torch.save({"state_dict": both}, tmp_path / "both.ckpt")
    model = create_model("resnet18", layers=TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="'state_dict.model._orig_mod.conv1.weight' and 'state_dict.model.conv1"):
        load_pretrained(model, tmp_path / "both.ckpt")
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "wrap",
    [nn.DataParallel, torch.compile, lambda m: torch.compile(nn.DataParallel(m))],
    ids=["DataParallel", "compile", "compiled-DataParallel"],
)
def test_wrapped_model_loads_into_the_module_it_wraps(tmp_path, wrap):
    """DataParallel / DDP (`module.`) and torch.compile (`_orig_mod.`) prefix the model's own keys; the loader
    fills the wrapped model, from a plain file or one saved through a wrapper."""
    ref = randomize(create_model("resnet18", layers=TINY))
    torch.save(ref.state_dict(), tmp_path / "plain.pth")
    torch.save(nn.DataParallel(ref).state_dict(), tmp_path / "ddp.pth")
    for name in ("plain.pth", "ddp.pth"):
        ours = create_model("resnet18", layers=TINY)
        report = load_pretrained(wrap(ours), tmp_path / name)
        assert report.loaded and not report.missing and max_diff(ref, ours) == 0


def test_url_source_is_fetched_only_when_given(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    ref = randomize(create_model("resnet18", layers=TINY))
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    ours = create_model("resnet18", layers=TINY)
    load_pretrained(ours, (tmp_path / "r18.pth").as_uri())
    assert max_diff(ref, ours) == 0


def test_urls_sharing_a_base_name_are_cached_apart(tmp_path, monkeypatch):
    """Two releases served as .../v1/r18.pth and .../v2/r18.pth: each URL loads its own weights, also from cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    refs = {}
    for seed, release in enumerate(("v1", "v2")):
        refs[release] = randomize(create_model("resnet18", layers=TINY), seed=seed)
        (tmp_path / "www" / release).mkdir(parents=True)
        torch.save(refs[release].state_dict(), tmp_path / "www" / release / "r18.pth")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path / "www"))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            for _ in range(2):  # the second round reads the cached files
                for release, ref in refs.items():
                    ours = create_model("resnet18", layers=TINY)
                    load_pretrained(ours, f"{base}/{release}/r18.pth")
                    assert max_diff(ref, ours) == 0, release
        finally:
            server.shutdown()
    cached = sorted(p.name for p in (Path(torch.hub.get_dir()) / "checkpoints").iterdir())
    assert len(cached) == 2 and all(n.startswith("r18-") and n.endswith(".pth") for n in cached)


# -------------------------------------------------------------------------------------------- our own format


@pytest.fixture(scope="module")
def caffe_se50():
    """A Cadene SE-ResNet-50 (one block per stage) converted to ours: Caffe geometry, recorded."""
    ref = legacy_model("legacy_seresnet50", TINY)
    return ref, create_pretrained("se_resnet50", ref.state_dict(), layers=TINY).eval()


def test_ours_records_architecture_and_preprocessing_and_rebuilds(caffe_se50, tmp_path):
    ref, model = caffe_se50
    path = tmp_path / "se50.safetensors"
    save_checkpoint(model, path, name="se_resnet50", options={"layers": TINY, "style": "caffe"})
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["model"] == "se_resnet50"
    assert record["options"]["style"] == "caffe" and record["options"]["layers"] == [1, 1, 1, 1]
    assert record["geometry"] == {
        "stem_pool_ceil": True, "stride_in_1x1": True, "se_squeeze": "avg", "se_gate": "sigmoid",
        "se_placement": "standard",
    }  # fmt: skip
    assert record["preprocessing"] == {
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "channel_order": "RGB",
        "input_size": [3, 224, 224],
    }  # fmt: skip
    rebuilt = create_pretrained(None, path)
    assert rebuilt.stride_in_1x1 and rebuilt.stem_pool_ceil
    assert max_diff(ref, rebuilt) < 1e-5
    # the registry path refuses the PyTorch geometry, naming the option
    with pytest.raises(CheckpointError, match="style='caffe'"):
        create_model("se_resnet50", layers=TINY, pretrained=path)
    assert max_diff(ref, create_model("se_resnet50", layers=TINY, style="caffe", pretrained=path)) < 1e-5
    # options that do not describe the model are refused rather than recorded
    with pytest.raises(ValueError, match="does not build this model"):
        save_checkpoint(model, tmp_path / "wrong.safetensors", name="se_resnet50", options={"layers": TINY})


def test_plain_state_dict_of_our_caffe_model_needs_format_ours(caffe_se50, tmp_path):
    _, model = caffe_se50
    torch.save(model.state_dict(), tmp_path / "ours_plain.pth")
    target = create_model("se_resnet50", layers=TINY, style="caffe")
    with pytest.raises(CheckpointError, match="format='ours'"):  # plain timm names promise PyTorch geometry
        load_pretrained(target, tmp_path / "ours_plain.pth")
    assert load_pretrained(target, tmp_path / "ours_plain.pth", format="ours").format == "ours"


def test_interrupted_writes_never_leave_a_half_checkpoint(caffe_se50, tmp_path, monkeypatch):
    import safetensors.torch

    _, model = caffe_se50
    path = tmp_path / "se50.safetensors"
    options = {"layers": TINY, "style": "caffe"}
    save_checkpoint(model, path, name="se_resnet50", options=options)
    saved = path.read_bytes(), path.with_suffix(".json").read_bytes()

    def dies_halfway(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, path, name="se_resnet50", options=options)
    assert (path.read_bytes(), path.with_suffix(".json").read_bytes()) == saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["se50.json", "se50.safetensors"]
    monkeypatch.undo()

    replace, calls = os.replace, []

    def dies_between_files(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(os, "replace", dies_between_files)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, path, name="se_resnet50", options=options)
    # cut between the renames of a first write: no weights that would read as a foreign file without a record
    calls.clear()
    fresh = tmp_path / "fresh" / "se50.safetensors"
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, fresh, name="se_resnet50", options=options)
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="write interrupted"):
        create_pretrained(None, path)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        create_pretrained(None, fresh)
    assert [p.name for p in fresh.parent.iterdir()] == ["se50.json"]


def test_written_checkpoints_are_readable_as_any_file_the_user_writes(caffe_se50, tmp_path):
    """Staged writes (mkstemp, safetensors) make 0600 files; a checkpoint gets what umask gives a plain open()."""
    _, model = caffe_se50
    umask = os.umask(0o022)
    try:
        options = {"layers": TINY, "style": "caffe"}
        save_checkpoint(model, tmp_path / "se50.safetensors", name="se_resnet50", options=options)
        save_detectron2(model, tmp_path / "se50.pkl", name="se_resnet50", options=options)
    finally:
        os.umask(umask)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {
        "se50.safetensors": 0o644, "se50.json": 0o644, "se50.pkl": 0o644,
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------- detectron2


def test_detectron2_export_keys_values_and_record(caffe_se50, tmp_path):
    ref, model = caffe_se50
    sd = model.state_dict()
    exported = to_detectron2(sd)
    expected = {DETECTRON2_PREFIX + k for k in sd if not k.startswith("fc.") and "num_batches_tracked" not in k}
    assert set(exported) == expected
    assert "backbone.bottom_up.layer1.0.se.fc1.weight" in exported and "backbone.bottom_up.fc.weight" not in exported
    for key, value in exported.items():
        assert value.dtype.name == "float32" and (value == sd[key[len(DETECTRON2_PREFIX) :]].numpy()).all()
    assert set(to_detectron2(sd, prefix="")) == {k[len(DETECTRON2_PREFIX) :] for k in expected}

    path = save_detectron2(
        model, tmp_path / "se50_d2.pkl", name="se_resnet50", options={"layers": TINY, "style": "caffe"}
    )
    with open(path, "rb") as f:
        payload = pickle.load(f, encoding="latin1")  # as detectron2's DetectionCheckpointer reads it
    assert payload["__author__"] == "senet-suite" and payload["matching_heuristics"] is False
    senet = payload["__senet__"]
    assert senet["input_format"] == "RGB" and senet["stride_in_1x1"] is True
    assert senet["pixel_mean"] == pytest.approx([123.675, 116.28, 103.53])
    assert senet["pixel_std"] == pytest.approx([58.395, 57.12, 57.375])
    # our loader reads it back (numpy-only unpickler) with its recorded geometry
    features = create_model("se_resnet50", layers=TINY, style="caffe", num_classes=0).eval()
    report = load_pretrained(features, path)
    assert (report.file_format, report.prefix, report.format) == ("detectron2", "model.backbone.bottom_up.", "ours")
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        for name, value in model.forward_features(x).items():
            assert torch.equal(features.forward_features(x)[name], value), name
    with pytest.raises(CheckpointError, match="style='caffe'"):
        load_pretrained(create_model("se_resnet50", layers=TINY, num_classes=0), path)


def test_detectron2_checkpointer_reads_the_export(caffe_se50, tmp_path):
    pytest.importorskip("detectron2", reason="detectron2 is installed by hand; the key mapping is tested without it")
    from detectron2.checkpoint import DetectionCheckpointer

    _, model = caffe_se50
    path = save_detectron2(
        model, tmp_path / "se50_d2.pkl", name="se_resnet50", options={"layers": TINY, "style": "caffe"}
    )
    holder = nn.Module()
    holder.backbone = nn.Module()
    holder.backbone.bottom_up = create_model("se_resnet50", layers=TINY, style="caffe", num_classes=0)
    DetectionCheckpointer(holder).load(str(path))
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        want, got = model.eval().forward_features(x), holder.eval().backbone.bottom_up.forward_features(x)
    for name in want:
        assert torch.equal(want[name], got[name]), name


def test_public_api_is_exported():
    for name in ("load_pretrained", "create_pretrained", "read_checkpoint", "save_checkpoint", "to_detectron2"):
        assert callable(getattr(backbones, name))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_weights_are_refused_unless_allowed(tmp_path, value):
    """Issue 14, item 1: a diverged run's weights are refused where they are read, naming the file and key."""
    source = create_model("se_resnet50", layers=(1, 1, 1, 1))
    weights = source.state_dict()
    weights["layer2.0.conv2.weight"][0, 0, 0, 0] = value
    path = tmp_path / "diverged.pth"
    torch.save(weights, path)
    target = create_model("se_resnet50", layers=(1, 1, 1, 1))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"diverged.pth: 1 tensor\(s\) hold NaN or inf, the first layer2.0.conv2"):
        load_pretrained(target, path)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    load_pretrained(target, path, allow_nonfinite=True)
    assert not torch.isfinite(target.layer2[0].conv2.weight).all()
    with pytest.raises(CheckpointError, match="NaN or inf"):
        create_pretrained("se_resnet50", path, layers=(1, 1, 1, 1))


def test_a_directory_is_called_a_directory(tmp_path):
    """Issue 14, item 10: a folder given as the checkpoint is named as such, not as a missing file."""
    (tmp_path / "weights.pth").mkdir()
    with pytest.raises(CheckpointError, match=r"weights.pth: a directory, not a checkpoint file"):
        load_pretrained(create_model("resnet18"), tmp_path / "weights.pth")
