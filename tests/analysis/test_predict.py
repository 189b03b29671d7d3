"""tools/predict.py: top-k names from a trained checkpoint with its own preprocessing, the IO vote, CAMs."""

from __future__ import annotations

import csv
import json
import sys

import cv2
import numpy as np
import pytest
import torch

from classification.cam import class_activation_maps, features_and_logits
from classification.inference import Classifier, Preprocessing, load_classifier, validation_samples
from classification.predict import io_vote, main, predict, read_io_labels
from classification.samples import DataError

from .conftest import BLOB, BLOB_MEAN, BLOB_STD, blob_images


def test_predicts_the_classes_the_smoke_model_learnt(cifar_checkpoint, tmp_path, one_thread):
    out_csv, out_json = tmp_path / "p.csv", tmp_path / "p.json"
    preds = main([str(cifar_checkpoint), "--val", "40", "--top-k", "3", "--csv", str(out_csv), "--json", str(out_json)])
    assert len(preds) == 40
    right = [p.top[0][0] == p.label for p in preds]
    assert sum(right) >= 34, f"only {sum(right)}/40 right"  # ~9% validation error
    for p in preds:
        index, name, prob = p.top[0]
        assert name == f"synthetic_{index}"  # the class names the CIFAR DataModule gives the synthetic data
        assert [q for *_, q in p.top] == sorted((q for *_, q in p.top), reverse=True) and prob <= 1
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 120 and rows[0]["rank"] == "1" and rows[0]["name"] == preds[0].top[0][1]
    assert json.loads(out_json.read_text())[0]["top"][0]["index"] == preds[0].top[0][0]


def test_preprocessing_is_the_trainings_own(cifar_checkpoint, one_thread):
    """The probabilities equal those of the trained LightningModule on the DataModule's own validation batch."""
    from classification.module import ClassificationModule

    classifier = load_classifier(cifar_checkpoint)
    assert classifier.preprocessing == Preprocessing((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 32, 32)
    samples = validation_samples(classifier, 16)
    ours = predict(classifier, samples, top_k=10)

    dm = classifier.datamodule()
    index = torch.tensor([int(name[4:-1]) for name, _, _ in samples])  # "val[i]"
    images, labels = dm.on_after_batch_transfer((dm.val_set.images[index], dm.val_set.labels[index], index), 0)
    module = ClassificationModule.load_from_checkpoint(cifar_checkpoint, map_location="cpu").eval()
    with torch.no_grad():
        probs = module(images).softmax(1)
    for p, row, label in zip(ours, probs, labels, strict=True):
        assert p.label == label
        assert p.top[0][0] == row.argmax()
        got = torch.tensor([q for *_, q in sorted(p.top)])
        torch.testing.assert_close(got, row, atol=1e-6, rtol=1e-5)


def test_files_folders_and_lists(cifar_checkpoint, tmp_path, one_thread):
    """Images read from files give what the same pixels give in memory; folders and list files name them."""
    classifier = load_classifier(cifar_checkpoint)
    samples = validation_samples(classifier, 6)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, (_, image, _) in enumerate(samples):
        cv2.imwrite(str(folder / f"{i}.png"), image[..., ::-1])
    (tmp_path / "list.txt").write_text("\n".join(f"images/{i}.png {label}" for i, (*_, label) in enumerate(samples)))
    expected = [p.top[0] for p in predict(classifier, samples)]
    from_folder = main([str(cifar_checkpoint), str(folder), "--val", "0"])
    from_list = main([str(cifar_checkpoint), str(tmp_path / "list.txt")])
    assert [p.top[0] for p in from_folder] == [p.top[0] for p in from_list] == expected
    assert from_list[0].image.endswith("images/0.png") and from_list[0].label is None


def test_places365_checkpoint_gives_its_preprocessing_and_categories(tmp_path, one_thread):
    """A Places365 run's Lightning checkpoint: crop/resize/mean/std and the category names come from its data."""
    from backbones import create_model
    from places365 import Places365DataModule
    from places365.synthetic import SyntheticPlaces365, make_synthetic_places365

    root = tmp_path / "places"
    make_synthetic_places365(root, SyntheticPlaces365(classes=2, train_per_class=1, val_per_class=2, image_size=80))
    dm = Places365DataModule(str(root), crop_size=48, resize_size=56, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
    model = create_model("resnet18", layers=(1, 1, 1, 1), num_classes=365)
    path = tmp_path / "last.ckpt"
    hyper = {"model": "resnet18", "model_options": {"layers": [1, 1, 1, 1]}, "num_classes": 365}
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    data = {**dm.hparams, "_instantiator": "lightning.pytorch.cli.instantiate_module"}
    # as Lightning saves it: the DataModule's hyperparameters, and its state_dict (its class) under its qualname
    record = {"Places365DataModule": dm.state_dict()}
    torch.save({"state_dict": state, "hyper_parameters": hyper, "datamodule_hyper_parameters": data, **record}, path)

    classifier = load_classifier(path)
    assert classifier.preprocessing == Preprocessing((0.5, 0.4, 0.3), (0.2, 0.2, 0.2), 48, 56)
    categories = (root / "categories_places365.txt").read_text().split()[0::2]
    assert classifier.class_names[1] == categories[1].split("/", 2)[2]  # "/a/airplane_cabin" -> "airplane_cabin"
    samples = validation_samples(classifier, 4)
    assert [label for *_, label in samples] == [0, 0, 364, 364]
    io_file = tmp_path / "IO.txt"
    io_file.write_text("\n".join(f"{c} {1 + (i % 3 == 0)}" for i, c in enumerate(categories)))
    io_labels = read_io_labels(io_file, classifier.class_names)
    (pred,) = predict(classifier, samples[:1], io_labels=io_labels, cam_dir=tmp_path / "cam")
    probs = classifier.model(classifier.preprocessing.tensor(classifier.preprocessing.crop(samples[0][1]))[None])
    assert (pred.io_mean, pred.environment) == io_vote(probs.softmax(1)[0].detach().numpy(), io_labels)
    assert cv2.imread(pred.cam).shape == (256, 256, 3)


def test_io_vote_is_the_releases():
    """Mean IO label (1 indoor, 2 outdoor) of the 10 most likely classes; indoor below 1.5."""
    io_labels = np.array([1] * 6 + [2] * 14)
    probs = np.linspace(1, 0.5, 20)  # classes 0..9 most likely: six indoor, four outdoor
    mean, environment = io_vote(probs, io_labels)
    assert mean == pytest.approx(1.4) and environment == "indoor"
    probs = np.roll(probs, 1)  # 1..10 most likely: five and five, a tie is outdoor (mean 1.5 is not < 1.5)
    assert io_vote(probs, io_labels) == (1.5, "outdoor")


def test_io_file_is_checked(tmp_path):
    good = tmp_path / "io.txt"
    good.write_text("/a/airfield 2\n/a/airplane_cabin 1\n")
    assert read_io_labels(good, ["airfield", "airplane_cabin"]).tolist() == [2, 1]
    with pytest.raises(DataError, match="2 classes, the model has 3"):
        read_io_labels(good, ["a", "b", "c"])
    with pytest.raises(DataError, match="class 1 is 'airplane_cabin' there but 'bedroom'"):
        read_io_labels(good, ["airfield", "bedroom"])
    bad = tmp_path / "bad.txt"
    bad.write_text("/a/airfield 3\n")
    with pytest.raises(DataError, match="line 1"):
        read_io_labels(bad)


def test_cam_peaks_where_the_object_is(blob_model, one_thread):
    """The class evidence is a 10 x 10 square: the map of the predicted class peaks on it (stride 4 cells)."""
    images, labels, corners = blob_images(16, seed=1)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - BLOB_MEAN[0]) / BLOB_STD[0]
    with torch.no_grad():
        features, logits = features_and_logits(blob_model, x)
        cams = class_activation_maps(blob_model, features, logits.argmax(1)).numpy()
        torch.testing.assert_close(logits, blob_model(x))  # one pass gives the features and the same logits
    assert (logits.argmax(1).numpy() == labels).all()
    for cam, (y, x0) in zip(cams, corners, strict=True):
        row, col = np.unravel_index(cam.argmax(), cam.shape)
        cy, cx = (row + 0.5) * 4, (col + 0.5) * 4  # the cell's centre in image pixels
        assert y - 4 <= cy <= y + BLOB + 4 and x0 - 4 <= cx <= x0 + BLOB + 4


def test_safetensors_checkpoint_with_recorded_preprocessing(blob_model, tmp_path, one_thread):
    """Our safetensors + JSON checkpoint: the network and its recorded preprocessing (32 px: no resize)."""
    from backbones import save_checkpoint

    path = tmp_path / "blob.safetensors"
    save_checkpoint(blob_model, path, preprocessing={"mean": BLOB_MEAN, "std": BLOB_STD, "input_size": [3, 32, 32]})
    names = tmp_path / "names.txt"
    names.write_text("red\ngreen\nblue\nyellow\n")
    classifier = load_classifier(path, labels=names)
    assert classifier.preprocessing == Preprocessing(BLOB_MEAN, BLOB_STD, 32, 32)
    images, labels, _ = blob_images(8, seed=2)
    preds = predict(classifier, [(str(i), im, None) for i, im in enumerate(images)], top_k=2, cam_dir=tmp_path)
    assert [p.top[0][1] for p in preds] == [["red", "green", "blue", "yellow"][i] for i in labels]
    assert len(list(tmp_path.glob("*.png"))) == 8


def test_the_checkpoint_records_its_datamodule_class(cifar_checkpoint, tmp_path):
    """The trainer's checkpoint names its DataModule class (its state_dict, under its qualname); one without
    that record, or with a class that is not a DataModule, is refused with a DataError saying so."""
    ckpt = torch.load(cifar_checkpoint, map_location="cpu", weights_only=True)
    assert ckpt["CIFARDataModule"] == {"class_path": "cifar.data.CIFARDataModule"}
    old = tmp_path / "old.ckpt"
    torch.save({k: v for k, v in ckpt.items() if k != "CIFARDataModule"}, old)
    with pytest.raises(DataError, match="written before checkpoints recorded their DataModule class"):
        load_classifier(old)
    # a record names a class; it never makes the loader import a module (importing runs the module's code)
    for path in ("cifar.data.Nothing", "torch.nn.Module", "antigravity.Fly"):
        bad = tmp_path / "bad.ckpt"
        torch.save({**ckpt, "CIFARDataModule": {}, path.rsplit(".", 1)[1]: {"class_path": path}}, bad)
        with pytest.raises(DataError, match="is not one of the DataModules loaded here"):
            load_classifier(bad)
    assert "antigravity" not in sys.modules


def test_a_network_built_in_code_is_refused_without_a_name(tmp_path):
    path = tmp_path / "x.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"num_classes": 3}}, path)
    with pytest.raises(DataError, match="--model"):
        load_classifier(path)


def test_direct_classifier_object(blob_model):
    """`predict` takes any Classifier: a network built in code with its preprocessing."""
    classifier = Classifier(blob_model, ["r", "g", "b", "y"], Preprocessing(BLOB_MEAN, BLOB_STD, 32, 32), "test")
    images, labels, _ = blob_images(4, seed=3)
    (pred,) = predict(classifier, [("a", images[0], int(labels[0]))], top_k=1)
    assert pred.top[0][0] == labels[0] and len(pred.top) == 1
