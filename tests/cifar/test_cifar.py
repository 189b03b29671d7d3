"""CIFAR: the official file format (Python-2 pickles), bad input, augmentation paths, training, resume, configs."""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch import Callback
from scipy.stats import chi2_contingency, chisquare

from backbones import create_model
from cifar.data import CIFARDataModule
from cifar.files import CIFAR10, CIFAR100, CIFARFormatError, load_class_names, load_split
from cifar.synthetic import make_synthetic
from cifar.transforms import CIFAR10_MEAN, CIFAR10_STD, BatchAugment, crop_flip, train_transform
from classification.cli import run_cli
from tests.cifar.py2_release import write_cifar_folder, write_py2_pickle

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs/lightning/cifar"
TABLE_CONFIGS = sorted(CONFIGS.glob("cifar*.yaml"))  # the model configs; each runs on its recipe
TINY = "{depth_per_stage: 1, widths: [8, 16, 32], stem_width: 8}"


pytestmark = pytest.mark.usefixtures("one_thread")


def raw_batch(n: int, seed: int, label_key: str, num_classes: int) -> dict[bytes, object]:
    """A batch dict as the release has it: Python-2 str keys (bytes here), data uint8 (n, 3072)."""
    rng = np.random.default_rng(seed)
    batch = {
        b"batch_label": b"training batch 1 of 5",
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [b"img_%05d.png" % i for i in range(n)],
        label_key.encode(): [int(v) for v in rng.integers(0, num_classes, n)],
    }
    if label_key == "fine_labels":
        batch[b"coarse_labels"] = [int(v) for v in rng.integers(0, 20, n)]
    return batch


def write_release(root: Path, spec, n: int = 6) -> dict[str, dict]:
    """Every file of `spec` as random Python-2 pickles under root/<folder>; -> the dicts written."""
    folder = root / spec.folder
    folder.mkdir(parents=True)
    written = {}
    for i, name in enumerate((*spec.train_files, *spec.test_files)):
        written[name] = raw_batch(n, i, spec.label_key, spec.num_classes)
        write_py2_pickle(written[name], folder / name)
    names = [b"name_%d" % i for i in range(spec.num_classes)]
    write_py2_pickle({spec.names_key.encode(): names}, folder / spec.meta_file)
    return written


@pytest.mark.parametrize("spec", [CIFAR10, CIFAR100], ids=["cifar10", "cifar100"])
def test_fixture_behaves_like_the_python2_release(tmp_path, spec):
    write_release(tmp_path, spec)
    path = tmp_path / spec.folder / spec.test_files[0]
    as_str = pickle.loads(path.read_bytes(), encoding="latin1")
    as_bytes = pickle.loads(path.read_bytes(), encoding="bytes")
    assert {type(k) for k in as_str} == {str} and spec.label_key in as_str
    assert {type(k) for k in as_bytes} == {bytes} and spec.label_key.encode() in as_bytes
    assert isinstance(as_str["batch_label"], str) and isinstance(as_bytes[b"batch_label"], bytes)
    assert np.array_equal(as_str["data"], as_bytes[b"data"])
    with pytest.raises(UnicodeDecodeError):  # Python 3's default, like the real files
        pickle.loads(path.read_bytes())


@pytest.mark.parametrize("spec", [CIFAR10, CIFAR100], ids=["cifar10", "cifar100"])
def test_images_pixel_exact_and_labels(tmp_path, spec):
    written = write_release(tmp_path, spec)
    for train, names in ((True, spec.train_files), (False, spec.test_files)):
        images, labels = load_split(tmp_path, spec, train=train)
        data = np.concatenate([written[n][b"data"] for n in names])
        expected_labels = sum((written[n][spec.label_key.encode()] for n in names), [])
        assert images.shape == (len(data), 32, 32, 3) and images.dtype == np.uint8
        # formats.md: value (channel c, row r, col x) is data[c * 1024 + r * 32 + x]
        n, r, x, c = np.meshgrid(*map(np.arange, images.shape), indexing="ij")
        assert np.array_equal(images, data[n, c * 1024 + r * 32 + x])
        assert labels.tolist() == expected_labels
    assert load_class_names(tmp_path, spec) == [f"name_{i}" for i in range(spec.num_classes)]


def test_python3_pickles_with_str_keys_are_accepted_too(tmp_path):
    written = write_release(tmp_path, CIFAR100)
    py3 = {k.decode(): v for k, v in written["test"].items()}
    for protocol in (2, 4, 5):  # 5 stores arrays through numpy's _frombuffer
        (tmp_path / CIFAR100.folder / "test").write_bytes(pickle.dumps(py3, protocol=protocol))
        images, labels = load_split(tmp_path, CIFAR100, train=False)
        assert labels.tolist() == py3["fine_labels"]
        assert np.array_equal(images.transpose(0, 3, 1, 2).reshape(6, 3072), py3["data"])


class _RunsCode:
    """Unpickles as a call of `open(marker, "w")`: what any code in a hostile pickle could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    written = write_release(tmp_path, CIFAR10)
    marker = tmp_path / "ran"
    hostile = {**written["test_batch"], b"filenames": _RunsCode(marker)}
    write_py2_pickle(hostile, tmp_path / CIFAR10.folder / "test_batch")
    with pytest.raises(CIFARFormatError, match=r"test_batch: refused to unpickle it: it names io.open"):
        load_split(tmp_path, CIFAR10, train=False)
    assert not marker.exists()


def test_md5_verification(tmp_path):
    write_release(tmp_path, CIFAR10)
    with pytest.raises(CIFARFormatError, match=r"test_batch: MD5 [0-9a-f]{32} does not match the official 4035"):
        load_split(tmp_path, CIFAR10, train=False, verify_md5=True)
    actual = hashlib.md5((tmp_path / CIFAR10.folder / "test_batch").read_bytes()).hexdigest()
    spec = dataclasses.replace(CIFAR10, md5={**CIFAR10.md5, "test_batch": actual})
    assert len(load_split(tmp_path, spec, train=False, verify_md5=True)[0]) == 6


def test_missing_folder_and_missing_file_name_the_expected_layout(tmp_path):
    with pytest.raises(CIFARFormatError, match=r"cifar-10-batches-py does not exist.*data_batch_1.*--data.root"):
        load_split(tmp_path, CIFAR10, train=True)
    write_release(tmp_path, CIFAR10)
    (tmp_path / CIFAR10.folder / "data_batch_3").unlink()
    with pytest.raises(CIFARFormatError, match=r"missing .*data_batch_3; expected <root>/cifar-10-batches-py/ hold"):
        load_split(tmp_path, CIFAR10, train=True)
    # the user may also point root at the extracted folder itself
    assert len(load_split(tmp_path / CIFAR10.folder, CIFAR10, train=False)[0]) == 6


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b, d: b[: len(b) // 2], r"test_batch: not a readable CIFAR .*truncated or corrupt"),
        (lambda b, d: b"\x00garbage" * 10, r"test_batch: not a readable CIFAR"),
        (lambda b, d: {**d, b"data": d[b"data"][:, :3000]}, r"test_batch: 'data' must be a uint8 array .*3000"),
        (lambda b, d: {**d, b"labels": d[b"labels"][:-1]}, r"test_batch: 6 images but 'labels' has shape \(5,\)"),
        (lambda b, d: {**d, b"labels": [10] + d[b"labels"][1:]}, r"test_batch: labels\[0\] = 10 is outside 0..9"),
        (lambda b, d: {b"data": d[b"data"]}, r"test_batch: missing key\(s\) \['labels'\]"),
    ],
    ids=["truncated", "garbage", "shape", "label-count", "label-range", "no-labels"],
)
def test_bad_files_raise_errors_naming_the_file(tmp_path, damage, message):
    written = write_release(tmp_path, CIFAR10)
    path = tmp_path / CIFAR10.folder / "test_batch"
    out = damage(path.read_bytes(), written["test_batch"])
    if isinstance(out, bytes):
        path.write_bytes(out)
    else:
        write_py2_pickle(out, path)
    with pytest.raises(CIFARFormatError, match=message):
        load_split(tmp_path, CIFAR10, train=False)


def test_crop_flip_is_exact_and_matches_albumentations():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    chw = torch.from_numpy(image).permute(2, 0, 1)[None]
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
    for top, left, flip in [(0, 0, False), (8, 8, True), (3, 6, True), (5, 1, False)]:
        expected = padded[top : top + 32, left : left + 32]
        expected = expected[:, ::-1] if flip else expected
        out = crop_flip(chw, torch.tensor([top]), torch.tensor([left]), torch.tensor([flip]))
        assert torch.equal(out[0].permute(1, 2, 0), torch.from_numpy(expected.copy()))
        fixed = A.Compose(
            [
                A.Pad(4, fill=0, border_mode=cv2.BORDER_CONSTANT),
                A.Crop(x_min=left, y_min=top, x_max=left + 32, y_max=top + 32),
                A.HorizontalFlip(p=1.0 if flip else 0.0),
                A.Normalize(CIFAR10_MEAN, CIFAR10_STD),
            ]
        )
        batched = BatchAugment(CIFAR10_MEAN, CIFAR10_STD).normalize(out)[0].permute(1, 2, 0)
        assert torch.allclose(batched, torch.from_numpy(fixed(image=image)["image"]), atol=1e-5)


def decode(normalised: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crop offsets and flips back from augmented coordinate images (red = row + 1, green = col + 1)."""
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    pixels = ((normalised * std + mean) * 255).round().long().numpy()
    red, green = pixels[:, 0, 16], pixels[:, 1, 16]  # row 16 always lies inside the source image
    flip = green[:, 17] < green[:, 16]
    top = red[:, 16] - 1 - 16 + 4
    left = green[:, 16] - 1 + 4 - np.where(flip, 15, 16)
    return top, left, flip


def test_both_augmentation_paths_draw_the_same_crop_and_flip_distribution():
    n = 4000
    rows, cols = np.mgrid[1:33, 1:33].astype(np.uint8)
    coords = np.stack([rows, cols, np.zeros_like(rows)], axis=-1)  # (32, 32, 3)
    transform = train_transform(CIFAR10_MEAN, CIFAR10_STD)
    transform.set_random_seed(0)
    per_image = torch.stack([transform(image=coords)["image"] for _ in range(n)])
    batch = torch.from_numpy(coords).permute(2, 0, 1)[None].expand(n, -1, -1, -1)
    batched = BatchAugment(CIFAR10_MEAN, CIFAR10_STD, seed=0)(batch, torch.arange(n), epoch=3)
    draws = {"albumentations": decode(per_image), "batched": decode(batched)}
    for top, left, flip in draws.values():
        assert set(top) == set(left) == set(range(9))
        # uniform over the 81 crop positions and a fair coin (p-values of a fixed seed: not flaky)
        assert chisquare(np.bincount(top * 9 + left, minlength=81)).pvalue > 1e-3
        assert chisquare(np.bincount(flip, minlength=2)).pvalue > 1e-3
    for i, bins in enumerate((9, 9, 2)):  # and the two paths against each other: top, left, flip
        table = [np.bincount(np.asarray(d[i], dtype=int), minlength=bins) for d in draws.values()]
        assert chi2_contingency(table).pvalue > 1e-3
    # the batched draw changes with the epoch and the seed, and never with the batch it lands in
    again = BatchAugment(CIFAR10_MEAN, CIFAR10_STD, seed=0)(batch[:100], torch.arange(100), epoch=3)
    assert torch.equal(again, batched[:100])
    assert not torch.equal(BatchAugment(CIFAR10_MEAN, CIFAR10_STD, seed=0)(batch[:100], torch.arange(100), 4), again)


def fit(tmp_path: Path, *args: str, **cli_kwargs) -> object:
    base = [
        "fit",
        "--seed_everything=0",
        "--model.model=cifar_resnet110",
        f"--model.model_options={TINY}",
        "--model.lr=0.05",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--data.num_workers=0",
    ]
    return run_cli(CIFARDataModule, args=[*base, *args], **cli_kwargs)


def test_training_on_release_files_lowers_the_loss(tmp_path, capsys):
    train = make_synthetic(10, 192, seed=0)
    write_cifar_folder(tmp_path / "data", "cifar10", train, make_synthetic(10, 64, seed=1))
    cli = fit(tmp_path, "--data.root", str(tmp_path / "data"), "--data.batch_size=32", "--trainer.max_epochs=4")
    assert (
        "batch: 32 per device x 1 device(s) x 1 node(s) x 1 accumulated = 32 images per optimizer step, "
        "at lr 0.05" in capsys.readouterr().out
    )
    curves = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "TrainingCurves")
    losses = [v for _, v in curves.history["train/loss_epoch"]]
    assert losses[-1] < 0.8 * losses[0], losses
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert sorted(cli.datamodule.class_names) == sorted(f"class_{i}" for i in range(10))


class Crash(Callback):
    """Kills the run at the start of an epoch, as a pre-empted job would be."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")


def test_resumed_run_ends_with_the_same_weights(tmp_path):
    # augmentation on (batched path), shuffling, cosine lr per step, momentum: all must continue exactly
    common = ["--data.synthetic=true", "--data.synthetic_train=64", "--data.synthetic_val=16"]
    common += ["--data.batch_size=16", "--data.augment=batched", "--model.schedule=cosine", "--model.interval=step"]
    common += ["--trainer.max_epochs=4"]
    straight = fit(tmp_path / "straight", *common)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path / "split", *common, trainer_defaults={"callbacks": [Crash(epoch=2)]})
    resumed = fit(tmp_path / "split", *common, "--ckpt_path=last")
    assert resumed.trainer.global_step == straight.trainer.global_step == 16
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ckpt = torch.load(tmp_path / "split" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 3


# Parameter counts of the six Tables 4-5 networks (10 / 100 classes); the README quotes them.
PARAMS = {
    "cifar_resnet110": (1730522, 1736372),
    "cifar_se_resnet110": (1744760, 1750610),
    "cifar_resnet164": (1703258, 1726388),
    "cifar_se_resnet164": (1905362, 1928492),
    "cifar_wrn16_8": (10961370, 11007540),
    "cifar_se_wrn16_8": (11049290, 11095460),
}


def recipe_of(config: Path) -> Path:
    return CONFIGS / ("recipe_wrn.yaml" if "wrn" in config.stem else "recipe_resnet_he.yaml")


@pytest.mark.parametrize("config", TABLE_CONFIGS, ids=[p.stem for p in TABLE_CONFIGS])
def test_table_config_parses_and_builds_its_model(tmp_path, config):
    raw = yaml.safe_load(config.read_text())
    args = ["--config", str(recipe_of(config)), "--config", str(config), f"--trainer.default_root_dir={tmp_path}"]
    cli = run_cli(CIFARDataModule, args=args, run=False)
    hp, data = cli.model.hparams, cli.datamodule.hparams
    dataset, arch = config.stem.split("_", 1)
    assert data.dataset == dataset and hp.model == f"cifar_{arch}" and data.batch_size == 128
    assert cli.trainer.num_devices == 1  # batch 128 is the global batch of the recipe
    assert hp.num_classes == cli.datamodule.num_classes == (10 if dataset == "cifar10" else 100)
    params = sum(p.numel() for p in cli.model.model.parameters())
    assert params == PARAMS[hp.model][dataset == "cifar100"]
    assert (hp.lr, hp.momentum) == (0.1, 0.9)
    if "wrn" in arch:  # Zagoruyko and Komodakis
        assert hp.nesterov and hp.weight_decay == 5e-4 and hp.interval == "epoch"
        assert list(hp.milestones) == [60, 120, 160] and hp.gamma == 0.2 and cli.trainer.max_epochs == 200
        assert hp.warmup == 0
    else:  # He et al.
        assert not hp.nesterov and hp.weight_decay == 1e-4 and hp.interval == "step"
        assert list(hp.milestones) == [32000, 48000] and hp.gamma == 0.1 and cli.trainer.max_steps == 64000
        warmup = (400, "constant", 0.1) if "110" in arch else (0, hp.warmup_mode, hp.warmup_factor)
        assert (hp.warmup, hp.warmup_mode, hp.warmup_factor) == warmup
    assert raw["trainer"]["default_root_dir"] == f"output/{config.stem}"


def test_synthetic_data_module_batches(tmp_path):
    dm = CIFARDataModule(synthetic=True, synthetic_train=40, synthetic_val=20, batch_size=8, augment="batched")
    dm.setup("fit")
    images, labels, index = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (8, 3, 32, 32) and index.shape == (8,)
    x, y = dm.on_after_batch_transfer((images, labels, index), 0)
    assert x.dtype == torch.float32 and x.shape == (8, 3, 32, 32) and torch.equal(y, labels)
    assert create_model("cifar_resnet110", depth_per_stage=1)(x).shape == (8, 10)


def test_dataloader_workers_draw_different_augmentations(tmp_path):
    # forked workers inherit one albumentations RNG state; without reseeding they would repeat each other
    rows, cols = np.mgrid[1:33, 1:33].astype(np.uint8)
    coords = np.stack([rows, cols, np.zeros_like(rows)], axis=-1)
    dm = CIFARDataModule(synthetic=True, synthetic_train=64, synthetic_val=8, batch_size=32, num_workers=2)
    dm.setup("fit")
    dm.train_set.images = np.broadcast_to(coords, (64, 32, 32, 3))
    first, second = (decode(images) for images, _ in dm.train_dataloader())  # one batch from each worker
    assert not all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_help_says_batch_size_is_per_device(capsys):
    # every trainer takes the per-device batch (Places365 and ImageNet too, tests/places365): the help says so
    with pytest.raises(SystemExit):
        run_cli(CIFARDataModule, args=["fit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--data.batch_size BATCH_SIZE training images PER DEVICE, not global" in text
    assert "batch_size x devices x num_nodes x accumulate_grad_batches" in text


def test_a_model_config_without_its_recipe_is_refused(tmp_path, capsys):
    # alone it would train for Lightning's default 1000 epochs at a constant lr
    with pytest.raises(SystemExit):
        run_cli(
            CIFARDataModule, args=["fit", "--config", str(TABLE_CONFIGS[0]), f"--trainer.default_root_dir={tmp_path}"]
        )
    assert "fit needs trainer.max_epochs or trainer.max_steps" in capsys.readouterr().err


def test_one_seed_for_initialisation_data_order_and_augmentation(tmp_path, monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # restored afterwards: seed_everything sets it
    args = ["--data.synthetic=true", "--data.synthetic_train=64", "--data.batch_size=16", "--data.num_workers=0"]
    args += [
        "--data.augment=batched",
        f"--trainer.default_root_dir={tmp_path}",
        "--model.model_options={depth_per_stage: 1}",
    ]
    runs = {}
    for seed in (0, 0, 1):
        cli = run_cli(CIFARDataModule, args=[f"--seed_everything={seed}", *args], run=False)
        cli.datamodule.setup("fit")
        order = [index.tolist() for _, _, index in cli.datamodule.train_dataloader()]
        weights = next(cli.model.parameters()).detach().clone()
        runs.setdefault(seed, []).append((order, weights, cli.datamodule.batch_augment.seed))
    (order, weights, augment_seed), again = runs[0]
    assert again[0] == order and torch.equal(again[1], weights) and augment_seed == again[2] == 0
    other_order, other_weights, other_augment_seed = runs[1][0]
    assert other_order != order and not torch.equal(other_weights, weights) and other_augment_seed == 1
    with pytest.raises(SystemExit):  # and there is no other seed option
        run_cli(CIFARDataModule, args=["--data.seed=1", *args], run=False)


def test_se_reduction_from_a_yaml_reaches_every_se_block(tmp_path):
    """A CIFAR YAML's `model_options: {se_reduction: 8}` reaches the blocks through the one SEOptions object."""
    from backbones import SEOptions
    from backbones.models.se import SqueezeExcite

    override = tmp_path / "r8.yaml"
    override.write_text("model:\n  model_options:\n    se_reduction: 8\n    depth_per_stage: 1\n")
    config = CONFIGS / "cifar10_se_resnet110.yaml"
    args = ["--config", str(recipe_of(config)), "--config", str(config), "--config", str(override)]
    net = run_cli(CIFARDataModule, args=[*args, f"--trainer.default_root_dir={tmp_path}"], run=False).model.model
    assert net.arch["se"] == SEOptions(reduction=8)
    blocks = [m for m in net.modules() if isinstance(m, SqueezeExcite)]
    assert len(blocks) == 3 and all(b.fc1.out_channels * 8 == b.fc1.in_channels for b in blocks)
