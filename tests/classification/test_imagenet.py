"""ImageNet (ILSVRC2012) layout, the ImageNet trainer, and Places365 fine-tuning from its checkpoint."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from PIL import Image

from backbones import create_model
from backbones.checkpoints.loader import load_pretrained
from classification import ImageNetDataModule, run_cli
from classification.samples import DataError, ImageSampleDataset
from places365 import Places365DataModule, SyntheticPlaces365, make_synthetic_places365

REPO = Path(__file__).resolve().parents[2]
# the Section 5.1 configs: the recipe, then the model
IMAGENET_CONFIG = [
    *("--config", str(REPO / "configs/lightning/imagenet/recipe_section5.yaml")),
    *("--config", str(REPO / "configs/lightning/imagenet/imagenet_se_resnet50.yaml")),
]
# created out of sorted order: the class ids must still follow the sorted WordNet ids
WNIDS = {"n04592741": (200, 40, 40), "n01440764": (40, 200, 40), "n02102040": (40, 40, 200)}
SORTED = sorted(WNIDS)
TINY = ["--model.model", "resnet18", "--model.model_options", "{layers: [1, 1, 1, 1]}"]


def make_imagenet(root: Path, per_class: int = 2) -> Path:
    """train/<wnid>/<wnid>_<n>.JPEG (500x375 and 333x500, as ILSVRC2012 sizes run), val/<wnid>/ILSVRC2012_val_*.JPEG."""
    for val_index, (wnid, colour) in enumerate(WNIDS.items(), start=1):
        for i in range(per_class):
            size = (500, 375) if i % 2 == 0 else (333, 500)
            path = root / "train" / wnid / f"{wnid}_{i + 1}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", size, colour).save(path, quality=95)
        path = root / "val" / wnid / f"ILSVRC2012_val_{val_index:08d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (500, 400), colour).save(path, quality=95)
    return root


def test_imagenet_layout(tmp_path):
    root = make_imagenet(tmp_path / "imagenet")
    dm = ImageNetDataModule(str(root), batch_size=2, num_workers=0, crop_size=32, resize_size=37)
    dm.setup("fit")
    assert dm.class_names == SORTED and dm.num_classes == 3
    assert len(dm.train_set) == 6 and len(dm.val_set) == 3
    sample = dm.train_set.samples[0]
    assert sample.path == str(root / "train/n01440764/n01440764_1.JPEG") and sample.label == 0
    for dataset in (dm.train_set, dm.val_set):
        for i in range(len(dataset)):
            image, label = dataset[i]
            assert image.shape == (3, 32, 32)
            rgb = image.float().mean((1, 2))
            torch.testing.assert_close(rgb, torch.tensor(WNIDS[SORTED[label]], dtype=torch.float32), atol=4, rtol=0)


def test_imagenet_layout_errors(tmp_path):
    root = make_imagenet(tmp_path / "imagenet", per_class=1)
    flat = root / "val" / "ILSVRC2012_val_00000009.JPEG"
    flat.write_bytes((root / "val/n01440764/ILSVRC2012_val_00000002.JPEG").read_bytes())
    with pytest.raises(DataError, match="holds images directly.*sort them into"):
        ImageNetDataModule(str(root), num_workers=0).setup("validate")
    flat.unlink()
    (root / "val/n09999999").mkdir()
    (root / "val/n01440764/ILSVRC2012_val_00000002.JPEG").rename(root / "val/n09999999/x.JPEG")
    with pytest.raises(DataError, match="'n09999999' is no ImageNet wnid folder"):
        ImageNetDataModule(str(root), num_workers=0).setup("validate")
    (root / "train/dogs").mkdir()
    with pytest.raises(DataError, match=r"\['dogs'\] are not WordNet ids"):
        ImageNetDataModule(str(root), num_workers=0).setup("fit")


def test_a_model_with_fewer_outputs_than_classes_stops_before_training(tmp_path):
    root = make_imagenet(tmp_path / "imagenet", per_class=1)
    with pytest.raises(ValueError, match="the data has 3 classes but the model num_classes=2"):
        run_cli(ImageNetDataModule, ["fit", *TINY, "--model.num_classes", "2", "--data.root", str(root),
                      "--data.num_workers", "0", "--trainer.max_epochs", "1",
                      "--trainer.accelerator", "cpu", "--trainer.logger", "false",
                      "--trainer.default_root_dir", str(tmp_path / "out")])  # fmt: skip


class PreemptAtStep(Callback):
    """Kills the run before training step `step`, as a pre-empted job would be."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated pre-emption")


def test_config_writes_last_checkpoint_mid_epoch_and_resumes_from_it(tmp_path):
    root = make_imagenet(tmp_path / "imagenet", per_class=4)  # 12 images in batches of 2: 6 steps per epoch
    out = tmp_path / "out"
    args = ["fit", *IMAGENET_CONFIG, *TINY, "--model.num_classes", "3",
            "--trainer.callbacks.init_args.every_n_train_steps", "4",  # the config's step-based last.ckpt, sooner
            "--data.root", str(root), "--data.batch_size", "2", "--data.num_workers", "0",
            "--data.crop_size", "32", "--data.resize_size", "37", "--trainer.max_epochs", "2",
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32",
            "--trainer.enable_progress_bar", "false",
            "--trainer.num_sanity_val_steps", "0", "--trainer.default_root_dir", str(out)]  # fmt: skip
    with pytest.raises(RuntimeError, match="simulated pre-emption"):
        run_cli(ImageNetDataModule, args, trainer_defaults={"callbacks": [PreemptAtStep(5)]})
    last = out / "checkpoints/last.ckpt"
    assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]
    state = torch.load(last, weights_only=True)
    assert (state["epoch"], state["global_step"]) == (0, 4)  # 4 of the first epoch's 6 steps survive
    cli = run_cli(ImageNetDataModule, [*args, "--ckpt_path", "last"])
    assert cli.trainer.global_step == 12
    assert cli.trainer.checkpoint_callback.every_n_epochs == 1  # --checkpoint stays the first, for ckpt_path=best
    # the epoch-end and the step-based callbacks share one last.ckpt (no last-v1.ckpt beside it)
    # (and the recipe keeps an epoch file every 10 epochs only)
    assert sorted(p.name for p in last.parent.iterdir()) == ["best.ckpt", "last.ckpt"]
    state = torch.load(last, weights_only=True)
    assert (state["epoch"], state["global_step"]) == (1, 12)


def test_a_run_resumed_mid_epoch_trains_on_the_rest_of_the_epoch(tmp_path, monkeypatch):
    """The resumed epoch continues the interrupted order: no sample twice, none left out."""
    loaded = []  # train sample indices in the order they are loaded (no workers, no validation)
    getitem = ImageSampleDataset.__getitem__
    monkeypatch.setattr(ImageSampleDataset, "__getitem__", lambda self, i: loaded.append(i) or getitem(self, i))
    root = make_imagenet(tmp_path / "imagenet", per_class=4)  # 12 images in batches of 2: 6 steps per epoch

    def fit(out: Path, *args: str, **kwargs) -> list[int]:
        loaded.clear()
        run_cli(ImageNetDataModule, ["fit", *IMAGENET_CONFIG, *TINY,
                      "--model.num_classes", "3", "--trainer.callbacks.init_args.every_n_train_steps", "4",
                      "--data.root", str(root), "--data.batch_size", "2", "--data.num_workers", "0",
                      "--data.crop_size", "32", "--data.resize_size", "37", "--trainer.max_epochs", "2",
                      "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32",
                      "--trainer.logger", "false",
                      "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0",
                      "--trainer.default_root_dir", str(out), *args], **kwargs)  # fmt: skip
        return list(loaded)

    straight = fit(tmp_path / "straight")
    assert sorted(straight[:12]) == sorted(straight[12:]) == list(range(12)) and straight[:12] != straight[12:]
    # last.ckpt at step 4 (epoch 0, 8 samples in) and at step 8 (epoch 1, 4 samples in)
    for preempt, seen in ((5, 8), (9, 16)):
        out = tmp_path / f"preempted_at_{preempt}"
        with pytest.raises(RuntimeError, match="simulated pre-emption"):
            fit(out, trainer_defaults={"callbacks": [PreemptAtStep(preempt)]})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            resumed = fit(out, "--ckpt_path", "last")
        assert resumed == straight[seen:]
        assert not [w for w in caught if "not resumable" in str(w.message)]


class StartingWeights(Callback):
    """The network's weights when training starts (the pretrained file is loaded as fitting starts)."""

    def on_train_start(self, trainer, pl_module):
        self.state = {k: v.clone() for k, v in pl_module.model.state_dict().items()}


@pytest.mark.slow
def test_finetune_places365_from_imagenet_trainer_checkpoint(tmp_path):
    """ImageNet trainer (Section 5.1 config, tiny model) -> last.ckpt -> the common loader -> Places365 fine-tuning."""
    make_imagenet(tmp_path / "imagenet")
    common = ["--data.num_workers", "0", "--data.crop_size", "32", "--data.resize_size", "37"]
    common += ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32"]
    common += ["--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]
    common += ["--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "0"]
    common += ["--checkpoint.every_n_epochs", "0", "--checkpoint.monitor", "null"]  # last.ckpt only
    run_cli(
        ImageNetDataModule,
        ["fit", *IMAGENET_CONFIG, *TINY, *common,
         "--model.num_classes", "3", "--data.root", str(tmp_path / "imagenet"), "--data.batch_size", "3",
         "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path / "in1k")]
    )  # fmt: skip
    ckpt = tmp_path / "in1k/checkpoints/last.ckpt"
    trained = {k.removeprefix("model."): v for k, v in torch.load(ckpt, weights_only=True)["state_dict"].items()}

    # the common loader reads the Lightning checkpoint as it is
    model = create_model("resnet18", layers=(1, 1, 1, 1), num_classes=3)
    report = load_pretrained(model, str(ckpt))
    assert not report.missing and not report.unexpected
    torch.testing.assert_close(model.state_dict(), trained, atol=0, rtol=0)

    places = make_synthetic_places365(
        tmp_path / "places365", SyntheticPlaces365(classes=2, train_per_class=4, val_per_class=2, image_size=96)
    )
    cli = run_cli(
        Places365DataModule,
        ["--config", str(REPO / "configs/lightning/places365/places365_se_resnet50_finetune.yaml"), *TINY, *common,
         "--model.pretrained", str(ckpt), "--data.root", str(places), "--data.batch_size", "4",
         "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path / "ft")],
        run=False,
    )  # fmt: skip
    network = cli.model.model
    start = StartingWeights()
    cli.trainer.callbacks.append(start)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert network.fc.out_features == 365  # the 3-class ImageNet head was dropped, a 365-class one built
    for key, value in start.state.items():
        if not key.startswith("fc."):
            torch.testing.assert_close(value, trained[key], atol=0, rtol=0, msg=key)
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss_epoch"])
    assert not torch.equal(network.conv1.weight, trained["conv1.weight"])  # fine-tuning moved the weights
    assert (tmp_path / "ft/checkpoints/last.ckpt").is_file()
