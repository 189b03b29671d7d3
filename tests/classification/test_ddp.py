"""The trainers under Lightning DDP: 2 CPU processes (gloo), each tool run as users run it, by subprocess.

`--trainer.strategy ddp --trainer.devices 2 --trainer.accelerator cpu`: Lightning relaunches the script once
more (its subprocess launcher), as it does on a GPU machine. A `Probe` callback (added with
`--trainer.callbacks+=`) records, per rank, the training samples each process loaded, its checkpoint saves and
curve plots, and its final metrics. Checked: each epoch's samples split across the ranks (none lost, none
repeated but the sampler's padding), metrics reduced over the ranks (the validation error that of one process
on the same weights), files written by rank 0 alone, bad-sample counts summed, a mid-epoch step checkpoint
resumed to the uninterrupted run's exact weights, and a failing rank stopping the other with its message.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch import Callback
from torch.utils.data import DistributedSampler

from classification import BadSampleReport, ImageNetDataModule, TrainingCurves, run_cli
from classification.loaders import ResumableDataLoader
from classification.samples import DataError

REPO = Path(__file__).resolve().parents[2]
WORLD = 2
DDP = ["--trainer.strategy=ddp", f"--trainer.devices={WORLD}", "--trainer.accelerator=cpu", "--trainer.precision=32"]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"),
]


class Probe(Callback):
    """Records this rank's view of a fit into `<out>/rank<R>.json`; raises DataError on `fail_rank` at
    `fail_step`, as a bad image found by one process would."""

    def __init__(self, out: str, fail_rank: int = -1, fail_step: int = -1):
        self.out, self.fail_rank, self.fail_step = Path(out), fail_rank, fail_step
        self.seen: list[tuple[int, int]] = []  # (epoch, index) of every training sample loaded
        self.saves = self.plots = 0

    def setup(self, trainer, pl_module, stage):
        if stage != "fit":
            return
        seen, dataset = self.seen, trainer.datamodule.train_set
        base = type(dataset)

        class Recording(base):  # num_workers=0: loads happen in this process, during their epoch
            def __getitem__(self, i):
                seen.append((trainer.current_epoch, int(i)))
                return base.__getitem__(self, i)

        dataset.__class__ = Recording
        io, curves = trainer.strategy.checkpoint_io, next(c for c in trainer.callbacks if isinstance(c, TrainingCurves))
        save, plot = io.save_checkpoint, curves.plot
        io.save_checkpoint = lambda *a, **k: (setattr(self, "saves", self.saves + 1), save(*a, **k))[1]
        curves.plot = lambda *a, **k: (setattr(self, "plots", self.plots + 1), plot(*a, **k))[1]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if (trainer.global_rank, trainer.global_step) == (self.fail_rank, self.fail_step):
            raise DataError(f"simulated bad image on rank {trainer.global_rank}")

    def teardown(self, trainer, pl_module, stage):
        if stage == "fit":
            self.out.mkdir(parents=True, exist_ok=True)
            record = {"world": trainer.world_size, "seen": self.seen, "saves": self.saves, "plots": self.plots}
            record["metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()}
            (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def launch(
    tool: str, out: Path, *args: str, fail_rank: int = -1, fail_step: int = -1, check: bool = True
) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Run tools/<tool>.py fit under DDP with the Probe; -> the process and each rank's record."""
    command = [sys.executable, str(REPO / f"tools/{tool}.py"), "fit", *args, *DDP, *QUIET]
    command += [f"--trainer.default_root_dir={out}", f"--trainer.callbacks+={__name__}.Probe"]
    probe = {"out": out / "probe", "fail_rank": fail_rank, "fail_step": fail_step}  # after `+=`: the Probe's
    command += [f"--trainer.callbacks.init_args.{k}={v}" for k, v in probe.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert run.returncode == 0, run.stderr[-4000:]
    records = [json.loads(p.read_text()) for p in sorted((out / "probe").glob("rank*.json"))]
    return run, records


def check_split(records: list[dict], n: int, batch_size: int, epochs: int) -> None:
    """Every epoch: each rank loads ceil(n / ranks) samples (whole batches), all n are loaded, and only the
    DistributedSampler's padding (ranks x share - n) twice."""
    share = math.ceil(n / WORLD)
    assert share % batch_size == 0  # the fixture's sizes: drop_last then drops nothing
    assert [r["world"] for r in records] == [WORLD] * WORLD
    for epoch in range(epochs):
        shares = [[i for e, i in r["seen"] if e == epoch] for r in records]
        assert [len(s) for s in shares] == [share] * WORLD
        counts = Counter(i for s in shares for i in s)
        assert sorted(counts) == list(range(n))
        assert sum(c - 1 for c in counts.values()) == WORLD * share - n


def check_written_once(out: Path, records: list[dict]) -> None:
    """Checkpoints, curves and logs: written by rank 0 only."""
    assert records[0]["saves"] > 0 and records[0]["plots"] == 1
    assert [(r["saves"], r["plots"]) for r in records[1:]] == [(0, 0)] * (WORLD - 1)
    assert (out / "checkpoints/last.ckpt").is_file() and (out / "curves.png").is_file()
    assert [p.name for p in (out / "csv").iterdir()] == ["version_0"]
    assert [p.name for p in (out / "tensorboard").iterdir()] == ["version_0"]


def check_reduced(records: list[dict], single: dict[str, float]) -> None:
    """The epoch metrics are the same on every rank (reduced), and the validation error is that of one process
    evaluating the saved weights."""
    keys = ("train/loss_epoch", "train/top1_error", "val/loss", "val/top1_error", "val/top5_error")
    for key in keys:
        assert len({r["metrics"][key] for r in records}) == 1, key
    ddp = records[0]["metrics"]
    assert ddp["val/top1_error"] == pytest.approx(single["val/top1_error"], abs=1e-4)
    assert ddp["val/top5_error"] == pytest.approx(single["val/top5_error"], abs=1e-4)
    assert ddp["val/loss"] == pytest.approx(single["val/loss"], rel=1e-5)


def validate_one_process(datamodule_class, args: list[str], ckpt: Path, out: Path) -> dict[str, float]:
    cli = run_cli(
        datamodule_class,
        ["validate", *args, "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32", *QUIET,
         "--trainer.logger=false", f"--trainer.default_root_dir={out}", f"--ckpt_path={ckpt}"],
    )  # fmt: skip
    return {k: float(v) for k, v in cli.trainer.callback_metrics.items()}


# --- CIFAR: the smoke config, batched augmentation -------------------------------------------------------------
def test_cifar_ddp_splits_the_epoch_reduces_metrics_and_writes_once(tmp_path, one_thread):
    # 63 training images: shares of 32 (one padded), 4 batches of 8 per rank; 25 validation images: 13 + 12
    args = ["--config", str(REPO / "configs/lightning/smoke/cifar10_synthetic.yaml")]
    args += ["--data.synthetic_train=63", "--data.synthetic_val=25", "--data.batch_size=8", "--trainer.max_epochs=2"]
    out = tmp_path / "cifar"
    _, records = launch("train_cifar", out, *args)
    check_split(records, n=63, batch_size=8, epochs=2)
    check_written_once(out, records)
    from cifar.data import CIFARDataModule

    single = validate_one_process(CIFARDataModule, args, out / "checkpoints/last.ckpt", tmp_path / "single")
    check_reduced(records, single)


# --- Places365: the smoke config, bad samples skipped ----------------------------------------------------------
def test_places365_ddp_sums_bad_samples_over_ranks(tmp_path, one_thread):
    from places365 import Places365DataModule, SyntheticPlaces365, make_synthetic_places365

    root = make_synthetic_places365(
        tmp_path / "places365", SyntheticPlaces365(classes=3, train_per_class=5, val_per_class=3, image_size=64)
    )
    train = (root / "places365_train_standard.txt").read_text().splitlines()
    val = (root / "places365_val.txt").read_text().splitlines()
    # one bad training image in each rank's share (the DistributedSampler's order, seed 0: the second, as the
    # first of rank 0 is also the padding at the end of rank 1's), one bad val image
    bad_train = [list(DistributedSampler(train, WORLD, rank, shuffle=True, seed=0))[1] for rank in range(WORLD)]
    bad_val = 4
    for i in bad_train:
        (root / "data_256" / train[i].split()[0].lstrip("/")).write_bytes(b"not a jpeg")
    (root / "val_256" / val[bad_val].split()[0]).write_bytes(b"not a jpeg")
    args = ["--config", str(REPO / "configs/lightning/smoke/places365_synthetic.yaml"), f"--data.root={root}"]
    args += ["--data.skip_bad_samples=true", "--data.num_workers=0", "--data.batch_size=4", "--trainer.max_epochs=1"]
    args += ["--data.crop_size=32", "--data.resize_size=37"]
    out = tmp_path / "places"
    _, records = launch("train_places365", out, *args)
    check_split(records, n=15, batch_size=4, epochs=1)
    check_written_once(out, records)
    # each rank counts the bad sample it loaded; the report sums them, and every rank logs the sum
    assert [sum(i in bad_train for _, i in r["seen"]) for r in records] == [1] * WORLD
    assert [r["metrics"]["train/bad_samples"] for r in records] == [WORLD] * WORLD
    assert [r["metrics"]["val/bad_samples"] for r in records] == [1] * WORLD  # evaluation reads each sample once
    single = validate_one_process(Places365DataModule, args, out / "checkpoints/last.ckpt", tmp_path / "single")
    assert single["val/bad_samples"] == 1
    check_reduced(records, single)


# --- ImageNet: the Section 5.1 recipe with its step checkpoints; a failure, then a resume ----------------------
def make_imagenet(root: Path) -> Path:
    from tests.classification.test_imagenet import make_imagenet as make

    return make(root, per_class=5)  # 15 training images (shares of 8, one padded), 3 validation images (2 + 1)


def imagenet_args(root: Path) -> list[str]:
    config = REPO / "configs/lightning/imagenet"
    return [
        *("--config", str(config / "recipe_section5.yaml"), "--config", str(config / "imagenet_se_resnet50.yaml")),
        "--model.model=resnet18", "--model.model_options={layers: [1, 1, 1, 1]}", "--model.num_classes=3",
        "--model.lr=0.05", "--trainer.callbacks.init_args.every_n_train_steps=2", f"--data.root={root}",
        "--data.batch_size=2", "--data.num_workers=0", "--data.crop_size=32", "--data.resize_size=37",
        "--trainer.max_epochs=2",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def imagenet_straight(tmp_path_factory) -> tuple[Path, list[str], list[dict]]:
    tmp = tmp_path_factory.mktemp("imagenet")
    args = imagenet_args(make_imagenet(tmp / "imagenet"))
    _, records = launch("train_imagenet", tmp / "straight", *args)
    return tmp / "straight", args, records


def test_imagenet_ddp_splits_the_epoch_reduces_metrics_and_writes_once(imagenet_straight, tmp_path, one_thread):
    out, args, records = imagenet_straight
    check_split(records, n=15, batch_size=2, epochs=2)
    check_written_once(out, records)
    single = validate_one_process(ImageNetDataModule, args, out / "checkpoints/last.ckpt", tmp_path)
    check_reduced(records, single)


def test_imagenet_ddp_failing_rank_stops_all_and_step_checkpoint_resumes_exactly(imagenet_straight, tmp_path):
    straight_out, args, straight = imagenet_straight
    out = tmp_path / "split"
    # rank 1 fails before step 3: the step checkpoint of step 2 (mid-epoch 0) is the last
    failed, _ = launch("train_imagenet", out, *args, fail_rank=1, fail_step=3, check=False)
    assert failed.returncode != 0
    assert "error (rank 1 of 2): simulated bad image on rank 1" in failed.stderr  # one line, its own message
    # rank 0 stops too: at its next collective (gloo), with a line that points to rank 1's, or killed by
    # Lightning's process observer (NCCL hangs instead)
    pointer = "error (rank 0 of 2): stopped: another process of this run failed, its error is above"
    assert pointer in failed.stderr or failed.returncode == -9, failed.stderr[-3000:]
    last = torch.load(out / "checkpoints/last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (0, 2)
    assert last["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 0, "batches": 2, "replicas": 2}]

    _, resumed = launch("train_imagenet", out, *args, "--ckpt_path=last")
    for rank in range(WORLD):  # each rank continues its own share where the checkpoint left it
        assert resumed[rank]["seen"] == straight[rank]["seen"][2 * 2 :]
    a = torch.load(straight_out / "checkpoints/last.ckpt", weights_only=True)
    b = torch.load(out / "checkpoints/last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 8
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert resumed[0]["metrics"]["val/top1_error"] == straight[0]["metrics"]["val/top1_error"]


# --- the rank-aware parts of the loaders, in one process ---------------------------------------------------------
def ranked(dm, rank: int, world: int = WORLD):
    """`dm` as process `rank` of a `world`-process run sees it (what setup and the loaders read of the trainer)."""
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, callbacks=[BadSampleReport()])
    return dm


@pytest.mark.parametrize("workers", [0, 1])
def test_each_rank_draws_its_own_augmentation(tmp_path, workers, one_thread):
    import numpy as np

    from places365.synthetic import class_image, write_jpeg

    root, rng = tmp_path / "imagenet", np.random.default_rng(0)
    for i in range(8):  # striped images: a crop or a flip shows in the pixels
        split = "val" if i > 5 else "train"
        write_jpeg(root / f"{split}/n0000000{i % 2}/{i}.JPEG", class_image(i % 2, 2, 64, rng))

    def first_batch(rank: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        dm = ImageNetDataModule(str(root), batch_size=4, num_workers=workers, crop_size=32, resize_size=37)
        if rank is not None:
            ranked(dm, rank)
        dm.setup("fit")
        torch.manual_seed(0)  # as seed_everything leaves every rank: the workers' base seed comes from it
        return next(iter(dm.train_dataloader()))

    alone, rank0, rank1 = first_batch(None), first_batch(0), first_batch(1)
    assert torch.equal(rank0[0], alone[0])  # rank 0 draws what one process draws
    assert torch.equal(rank1[1], rank0[1]) and not torch.equal(rank1[0], rank0[0])  # same images, other crops


def test_evaluation_reads_each_sample_on_exactly_one_rank(tmp_path):
    root = make_imagenet(tmp_path / "imagenet")  # 3 validation images
    dm = ImageNetDataModule(str(root), batch_size=2, num_workers=0, crop_size=32, resize_size=37)
    ranked(dm, 0).setup("validate")
    shares = [list(ranked(dm, rank).val_dataloader().sampler) for rank in range(WORLD)]
    assert shares == [[0, 2], [1]]  # not padded to [[0, 2], [1, 0]], which would count image 0 twice
    # more ranks than images: Lightning's padded sampler stays (an empty share would stall DDP's first batch)
    assert not isinstance(ranked(dm, 0, world=4).val_dataloader().sampler, DistributedSampler)


def test_resuming_mid_epoch_on_another_process_count_warns():
    data = list(range(16))

    def loader(replicas: int, rank: int = 0) -> ResumableDataLoader:
        sampler = DistributedSampler(data, replicas, rank, shuffle=True, seed=0)
        return ResumableDataLoader(data, batch_size=2, sampler=sampler)

    interrupted = loader(2, rank=1)
    batches = iter(interrupted)
    next(batches), next(batches)
    state = interrupted.state_dict()
    assert state == {"epoch": 0, "batches": 2, "replicas": 2}
    same = loader(2, rank=1)
    same.load_state_dict(state)
    assert [b.tolist() for b in same] == [b.tolist() for b in batches]  # the same count continues the share
    for replicas in (1, 4):
        other = loader(replicas)
        other.load_state_dict(state)
        with pytest.warns(UserWarning, match=f"resuming mid-epoch 0 on {replicas} process.* of 2: each process skips"):
            list(other)
