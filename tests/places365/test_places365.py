"""Places365: every official layout read as released, bad input, skipping bad samples, a short training run
evaluated on ten crops, the recipe configs.

Fixtures follow formats.md: the real categories file, list lines as released (`/a/airfield/00000001.jpg 0`,
`Places365_val_00000001.jpg 165`, no trailing newline), JPEGs of 256x256 and of shorter side 512.
"""

from __future__ import annotations

import contextlib
import csv
import io
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from PIL import Image

from classification import BadSampleReport, ImageNetDataModule, run_cli
from classification.module import ClassificationModule
from classification.samples import DataError
from classification.transforms import normalize
from places365 import Places365DataModule

REPO = Path(__file__).resolve().parents[2]
# four classes, two of them three-level names; each class has its own colour, so a loaded image shows its label
CLASSES = {0: "/a/airfield", 8: "/a/apartment_building/outdoor", 15: "/a/arena/hockey", 364: "/z/zen_garden"}
COLOURS = {0: (200, 40, 40), 8: (40, 200, 40), 15: (40, 40, 200), 364: (200, 200, 40)}
CROP = 32  # small crops keep the tests fast; the pipeline is the same at 224


@pytest.fixture(scope="module")
def categories(shared_dir) -> Path:
    return shared_dir / "data" / "categories_places365.txt"


def write_jpeg(path: Path, hw: tuple[int, int], colour) -> None:
    """A solid-colour JPEG written by PIL (not by the OpenCV decoder under test)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (hw[1], hw[0]), colour).save(path, quality=95)


def make_lists_release(
    root: Path, categories: Path, *, train_set="standard", train_dir="data_256", val_dir="val_256", hw=(256, 256)
) -> Path:
    """A devkit release: categories file, train list + train image tree, val list + flat val folder."""
    root.mkdir(parents=True)
    shutil.copyfile(categories, root / "categories_places365.txt")
    train, val = [], []
    for n, (label, name) in enumerate(CLASSES.items(), start=1):
        for i in (1, 2):
            write_jpeg(root / train_dir / f"{name[1:]}/{i:08d}.jpg", hw, COLOURS[label])
            train.append(f"{name}/{i:08d}.jpg {label}")
        write_jpeg(root / val_dir / f"Places365_val_{n:08d}.jpg", hw[::-1], COLOURS[label])
        val.append(f"Places365_val_{n:08d}.jpg {label}")
    (root / f"places365_train_{train_set}.txt").write_text("\n".join(train))
    (root / "places365_val.txt").write_text("\n".join(val))
    return root


def make_easyformat(root: Path, folder_names: dict[int, str], hw=(256, 256)) -> Path:
    """The ImageFolder release: train/<class>/, val/<class>/ (no lists)."""
    for n, (label, folder) in enumerate(folder_names.items(), start=1):
        for i in (1, 2):
            write_jpeg(root / "train" / folder / f"{i:08d}.jpg", hw, COLOURS[label])
        write_jpeg(root / "val" / folder / f"Places365_val_{n:08d}.jpg", hw, COLOURS[label])
    return root


def datamodule(root: Path, **kwargs) -> Places365DataModule:
    kwargs = {"batch_size": 4, "num_workers": 0, "crop_size": CROP, "resize_size": 37, **kwargs}
    return Places365DataModule(str(root), **kwargs)


def colour_of(image: torch.Tensor) -> torch.Tensor:
    """Mean RGB of a uint8 (3, H, W) image."""
    return image.float().mean((1, 2))


def check_release(dm: Places365DataModule, n_train: int = 8, n_val: int = 4) -> None:
    """Sample counts, labels, class names, and that every sample's pixels are its class's colour."""
    dm.setup("fit")
    assert len(dm.class_names) == 365
    assert dm.class_names[8] == "/a/apartment_building/outdoor" and dm.class_names[364] == "/z/zen_garden"
    for dataset, n in ((dm.train_set, n_train), (dm.val_set, n_val)):
        assert len(dataset) == n
        assert sorted(set(dataset.samples.labels.tolist())) == sorted(CLASSES)
        for i in range(n):
            image, label = dataset[i]
            assert image.shape == (3, CROP, CROP) and image.dtype == torch.uint8
            torch.testing.assert_close(
                colour_of(image), torch.tensor(COLOURS[label], dtype=torch.float32), atol=4, rtol=0
            )


def test_standard_list_with_data_256(tmp_path, categories):
    root = make_lists_release(tmp_path / "places365", categories)
    dm = datamodule(root)
    check_release(dm)
    sample = dm.train_set.samples[2]
    assert sample.path == str(root / "data_256/a/apartment_building/outdoor/00000001.jpg") and sample.label == 8
    assert sample.origin == f"{root / 'places365_train_standard.txt'} line 3"
    assert dm.val_set.samples[3].path == str(root / "val_256/Places365_val_00000004.jpg")


def test_challenge_list_with_data_large(tmp_path, categories):
    root = make_lists_release(
        tmp_path / "p", categories, train_set="challenge", train_dir="data_large", val_dir="val_large", hw=(512, 683)
    )
    dm = datamodule(root, train_set="challenge")
    check_release(dm)
    assert dm.train_set.samples[0].path.startswith(str(root / "data_large"))
    # resolution "256" must not silently fall back to the large images
    with pytest.raises(DataError, match="data_256_challenge, data_256"):
        datamodule(root, train_set="challenge", resolution="256").setup("fit")


@pytest.mark.parametrize("train_set", ["standard", "challenge"])
def test_torchvision_renamed_train_folder(tmp_path, categories, train_set):
    root = make_lists_release(tmp_path / "p", categories, train_set=train_set, train_dir=f"data_256_{train_set}")
    dm = datamodule(root, train_set=train_set)
    check_release(dm)
    assert dm.train_set.samples[0].path.startswith(str(root / f"data_256_{train_set}"))


def test_easyformat_tree_as_released(tmp_path, categories):
    root = make_easyformat(
        tmp_path / "places365_standard",
        {0: "airfield", 8: "apartment_building-outdoor", 15: "arena-hockey", 364: "zen_garden"},
    )
    shutil.copyfile(categories, root / "categories_places365.txt")
    check_release(datamodule(root))


def test_easyformat_nested_folders_and_categories_elsewhere(tmp_path, categories):
    root = make_easyformat(
        tmp_path / "p", {0: "a/airfield", 8: "apartment_building/outdoor", 15: "a/arena/hockey", 364: "zen_garden"}
    )
    with pytest.raises(DataError, match="categories_places365.txt not found"):
        datamodule(root).setup("fit")
    check_release(datamodule(root, categories_file=str(categories)))


def test_easyformat_unknown_class_folder(tmp_path, categories):
    root = make_easyformat(tmp_path / "p", {0: "airfield", 8: "not_a_place"})
    with pytest.raises(DataError, match=r"train/not_a_place: holds 2 images but 'not_a_place' is no Places365"):
        datamodule(root, categories_file=str(categories)).setup("fit")


def test_bad_images_name_file_and_list_line(tmp_path, categories):
    root = make_lists_release(tmp_path / "p", categories)
    good = (root / "data_256/a/airfield/00000001.jpg").read_bytes()
    (root / "data_256/a/airfield/corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg" * 20)
    (root / "data_256/a/airfield/truncated.jpg").write_bytes(good[: len(good) // 2])
    lst = root / "places365_train_standard.txt"
    lst.write_text(
        lst.read_text() + "\n/a/airfield/missing.jpg 0\n/a/airfield/corrupt.jpg 0\n/a/airfield/truncated.jpg 0"
    )
    dm = datamodule(root)
    dm.setup("fit")
    for index, what in (
        (8, "missing.jpg: file not found"),
        (9, "corrupt.jpg: not a decodable"),
        (10, "truncated.jpg: not a"),
    ):
        with pytest.raises(DataError, match=f"{what}.*places365_train_standard.txt line {index + 1}"):
            dm.train_set[index]


def test_label_out_of_range_and_malformed_lines(tmp_path, categories):
    root = make_lists_release(tmp_path / "p", categories)
    val = root / "places365_val.txt"
    lines = val.read_text().split("\n")
    val.write_text("\n".join([lines[0], "Places365_val_00000002.jpg 365", *lines[2:]]))
    with pytest.raises(DataError, match=r"places365_val.txt line 2: label 365 is outside 0..364"):
        datamodule(root).setup("validate")
    val.write_text("\n".join([lines[0], "Places365_val_00000002.jpg", *lines[2:]]))
    with pytest.raises(DataError, match=r"places365_val.txt line 2: expected '<image path> <label>'"):
        datamodule(root).setup("validate")


def test_categories_file_with_wrong_count(tmp_path, categories):
    root = make_lists_release(tmp_path / "p", categories)
    cats = root / "categories_places365.txt"
    cats.write_text("\n".join(categories.read_text().split("\n")[:364]))
    with pytest.raises(DataError, match=r"categories_places365.txt: expected 365 categories, found 364"):
        datamodule(root).setup("fit")
    cats.write_text(categories.read_text().replace("/a/airplane_cabin 1", "/a/airplane_cabin 7"))
    with pytest.raises(DataError, match="line 2: expected id 1"):
        datamodule(root).setup("fit")


def test_skip_bad_samples_counts_across_workers(tmp_path, categories):
    """2 unreadable train images, 1 bad train line, 1 missing val image: counted exactly with 2 workers."""
    root = make_lists_release(tmp_path / "p", categories)
    (root / "data_256/a/airfield/corrupt.jpg").write_bytes(b"garbage")
    lst = root / "places365_train_standard.txt"
    lst.write_text(lst.read_text() + "\n/a/airfield/missing.jpg 0\n/a/airfield/corrupt.jpg 0\n/z/zen_garden/x.jpg 400")
    val = root / "places365_val.txt"
    val.write_text(val.read_text() + "\nPlaces365_val_00000099.jpg 0")
    # 10 loadable-or-not train entries in 2 batches of 5 (drop_last drops nothing), 5 val entries
    dm = datamodule(root, batch_size=5, num_workers=2, skip_bad_samples=True)
    module = ClassificationModule("resnet18", model_options={"layers": (1, 1, 1, 1)}, num_classes=365, lr=0.01)
    kwargs = dict(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, default_root_dir=tmp_path)
    kwargs.update(enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    with pytest.raises(ValueError, match="skip_bad_samples needs the BadSampleReport callback"):
        Trainer(**kwargs).fit(module, dm)  # skipping is never silent
    trainer = Trainer(callbacks=[BadSampleReport()], **kwargs)  # as the CLI gives every run
    with pytest.warns(UserWarning) as record:
        trainer.fit(module, dm)
    train_lines, val_lines = dm.list_skipped["train"], dm.list_skipped["val"]
    assert train_lines.count == 1 and "label 400 is outside 0..364" in train_lines.examples[0]
    assert val_lines.count == 0
    assert trainer.callback_metrics["train/bad_samples"] == 2
    assert trainer.callback_metrics["val/bad_samples"] == 1
    messages = [str(w.message) for w in record]
    assert any("train: skipped 2 bad sample(s) (+ 1 bad list lines" in m and "missing.jpg" in m for m in messages)
    (val,) = [m for m in messages if "val: skipped" in m]
    assert "skipped 1 bad sample(s)" in val and "Places365_val_00000099.jpg" in val
    assert "bad list lines" not in val  # the bad line is the train list's: the val report does not claim it


def test_skip_gives_up_on_a_wrong_image_folder(tmp_path, categories):
    root = make_lists_release(tmp_path / "p", categories)
    shutil.rmtree(root / "val_256")
    (root / "val_256").mkdir()
    dm = datamodule(root, skip_bad_samples=True)
    dm.setup("validate")
    dm.val_set.max_consecutive_bad = 3
    with pytest.raises(DataError, match="4 consecutive samples could not be loaded.*Is the image folder right"):
        dm.val_set[0]


@pytest.mark.slow
def test_smoke_config_trains_and_loss_falls(tmp_path, categories):  # the generator copies the real file
    """The embedded default (configs/lightning/smoke/places365_synthetic.yaml), shrunk: generated release, a few steps;
    then the last checkpoint evaluated on ten crops through the same CLI."""
    out = tmp_path / "out"
    args = [
        "--config", str(REPO / "configs/lightning/smoke/places365_synthetic.yaml"),
        "--data.root", str(tmp_path / "data"),
        "--data.synthetic.classes", "4",
        "--data.synthetic.train_per_class", "16",
        "--data.synthetic.val_per_class", "4",
        "--data.synthetic.image_size", "96",
        "--data.num_workers", "0",
        "--data.batch_size", "16",
        "--data.crop_size", "32",
        "--data.resize_size", "37",
        "--trainer.max_epochs", "3",
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(out),
        "--checkpoint.every_n_epochs", "0", "--checkpoint.monitor", "null",  # last.ckpt only
    ]  # fmt: skip
    run_cli(Places365DataModule, ["fit", *args])
    lines = (tmp_path / "data/places365_train_standard.txt").read_text().split("\n")
    assert len(lines) == 64 and lines[0] == "/a/airfield/00000001.jpg 0"
    with open(out / "csv/version_0/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]
    assert len(losses) == 3 and losses[-1] < 0.6 * losses[0], losses
    assert (out / "checkpoints/last.ckpt").is_file() and (out / "curves.png").is_file()

    last = str(out / "checkpoints/last.ckpt")
    cli = run_cli(Places365DataModule, ["validate", *args, "--data.ten_crop", "true", "--ckpt_path", last])
    metrics, network, val_set = cli.trainer.callback_metrics, cli.model.model.eval(), cli.datamodule.val_set
    with torch.no_grad():  # by hand: the ten crops' mean softmax of the checkpoint's network
        probs = [network(normalize(val_set[i][0])).softmax(1).mean(0) for i in range(len(val_set))]
    labels = torch.tensor([val_set[i][1] for i in range(len(val_set))])
    probs = torch.stack(probs)
    assert probs.shape == (16, 365)
    hand_error = 100 * (probs.argmax(1) != labels).float().mean()
    hand_loss = -probs[torch.arange(16), labels].log().mean()
    assert metrics["val/top1_error"] == pytest.approx(float(hand_error), abs=1e-4)
    # abs: a near-zero loss is a sum of -log(p) with p within float32 rounding of 1
    assert metrics["val/loss"] == pytest.approx(float(hand_loss), rel=1e-4, abs=1e-7)


# config -> (model, lr, milestones, epochs, global batch, classes): Table 6 protocol, Section 5.1, fine-tuning
RECIPES = {
    "places365_se_resnet152": ("se_resnet152", 0.1, [30, 60], 90, 256, 365),
    "places365_resnet152": ("resnet152", 0.1, [30, 60], 90, 256, 365),
    "places365_se_resnet50_finetune": ("se_resnet50", 0.01, [10, 20], 30, 256, 365),
    "imagenet_se_resnet50": ("se_resnet50", 0.6, [30, 60, 90], 100, 1024, 1000),
    "imagenet_resnet50": ("resnet50", 0.6, [30, 60, 90], 100, 1024, 1000),
}
# the model configs' recipes (the fine-tuning config is its own recipe)
RECIPE_FILES = {"places365": "places365/recipe_table6.yaml", "imagenet": "imagenet/recipe_section5.yaml"}


def config_args(name: str) -> list[str]:
    """The --config arguments of a recipe config: its recipe first, when it has one."""
    task = name.split("_")[0]
    files = [f"{task}/{name}.yaml"] if "finetune" in name else [RECIPE_FILES[task], f"{task}/{name}.yaml"]
    return [a for f in files for a in ("--config", str(REPO / "configs/lightning" / f))]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_configs_follow_the_recipes(name):
    datamodule_class = ImageNetDataModule if name.startswith("imagenet") else Places365DataModule
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        run_cli(datamodule_class, ["fit", *config_args(name), "--print_config"])
    config = yaml.safe_load(out.getvalue())
    model, trainer, data = config["model"], config["trainer"], config["data"]
    # batch_size is per device: the recipe's batch is that of all devices, nodes and accumulated batches
    global_batch = data["batch_size"] * trainer["devices"] * trainer["num_nodes"] * trainer["accumulate_grad_batches"]
    got = (model["model"], model["lr"], model["milestones"], trainer["max_epochs"], global_batch)
    assert (*got, model["num_classes"]) == RECIPES[name]
    assert trainer["devices"] == 8 and data["batch_size"] == global_batch // 8  # 32 (Places365), 128 (ImageNet)
    assert trainer["default_root_dir"] == f"output/{name}"
    assert (model["momentum"], model["weight_decay"], model["gamma"], model["interval"]) == (0.9, 1e-4, 0.1, "epoch")
    assert data["crop_size"] == 224 and data["resize_size"] == 256 and list(data["scale"]) == [0.08, 1.0]
    if name.startswith("places365_se_resnet152") or name == "places365_resnet152":
        assert data["train_set"] == "challenge"  # Table 6 trains on Places365-Challenge
    if "finetune" in name:
        assert model["pretrained"].endswith("imagenet_se_resnet50/checkpoints/last.ckpt")
    else:  # long epochs: last.ckpt every N steps as well, into the same file as the epoch-end one
        (step,) = trainer["callbacks"]
        assert step["init_args"]["every_n_train_steps"] == (500 if name.startswith("imagenet") else 5000)
        assert step["init_args"]["save_last"] is True and step["init_args"]["save_top_k"] == 0
        assert step["init_args"]["enable_version_counter"] is False
        assert config["checkpoint"]["every_n_epochs"] == 10  # of large files, not every epoch's


@pytest.mark.parametrize("datamodule_class", [Places365DataModule, ImageNetDataModule])
def test_help_says_batch_size_is_per_device(datamodule_class, capsys):
    # one convention for every trainer (CIFAR's too, tests/cifar): the help must say which
    with pytest.raises(SystemExit):
        run_cli(datamodule_class, ["fit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--data.batch_size BATCH_SIZE training images PER DEVICE, not global" in text
    assert "batch_size x devices x num_nodes x accumulate_grad_batches" in text
