"""What a hostile or unlucky user still broke in the classification trainers (the reliability issue, items 3-8
and 10): the checkpoint policy, saves of diverged weights, a kill -9 mid-save, unwritable folders, a full disk,
and the messages that point at flags or files that do not exist."""

from __future__ import annotations

import builtins
import errno
import hashlib
import os
import runpy
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from torch import nn

from backbones import UntrustedCheckpointError, create_model
from classification.callbacks import NonFiniteLossError, NonFiniteLossGuard, TrainingCurves
from classification.checkpoints import AtomicCheckpointIO, RunCheckpoints
from classification.cli import ClassificationCLI, run_cli
from classification.module import ClassificationModule
from tests.classification.test_module import TINY, PoisonBatch, RandomData, TensorData, quiet_trainer, random_images

REPO = Path(__file__).resolve().parents[2]
TINY_ARG = "--model.model_options={depth_per_stage: 1, widths: [8, 16, 32], stem_width: 8}"

pytestmark = pytest.mark.usefixtures("one_thread")


def cli_args(root: Path, *args: str) -> list[str]:
    """`fit` of a tiny network on RandomData (8 images in batches of 4: 2 steps an epoch, validated each epoch)."""
    quiet = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false"]
    return ["fit", TINY_ARG, *quiet, f"--trainer.default_root_dir={root}", *args]


def fit(root: Path, *args: str, **kwargs) -> ClassificationCLI:
    return run_cli(RandomData, cli_args(root, *args), **kwargs)


class CountSteps(Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_end(self, *args):
        self.steps += 1


def ckpt_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- 3: the checkpoint policy -------------------------------------------------------------------------------
def test_checkpoints_keep_last_best_and_every_n_epochs(tmp_path):
    cli = fit(tmp_path / "every", "--trainer.max_epochs=3")
    folder = tmp_path / "every/checkpoints"
    assert ckpt_names(folder) == ["best.ckpt", "epoch000.ckpt", "epoch001.ckpt", "epoch002.ckpt", "last.ckpt"]
    assert torch.load(folder / "last.ckpt", weights_only=True)["epoch"] == 2
    curves = next(cb for cb in cli.trainer.callbacks if isinstance(cb, TrainingCurves))
    errors = [e for _, e in curves.history["val/top1_error"]]
    assert torch.load(folder / "best.ckpt", weights_only=True)["epoch"] == errors.index(min(errors))
    assert cli.trainer.checkpoint_callback.best_model_path == str(folder / "best.ckpt")  # --ckpt_path best

    fit(tmp_path / "second", "--trainer.max_epochs=3", "--checkpoint.every_n_epochs=2")
    assert ckpt_names(tmp_path / "second/checkpoints") == ["best.ckpt", "epoch001.ckpt", "last.ckpt"]
    fit(tmp_path / "last_only", "--trainer.max_epochs=2", "--checkpoint.every_n_epochs=0", "--checkpoint.monitor=null")
    assert ckpt_names(tmp_path / "last_only/checkpoints") == ["last.ckpt"]


# --- 4: finite weights and outputs before any save ----------------------------------------------------------
class CorruptAfterLastStep(Callback):
    """After the last optimizer step of `epoch`, which no recorded loss sees, makes the classifier `how`."""

    def __init__(self, epoch: int, how: str):
        self.epoch, self.how = epoch, how

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == trainer.num_training_batches - 1:
            fc = [m for m in pl_module.modules() if isinstance(m, nn.Linear)][-1]
            with torch.no_grad():
                if self.how == "nan":
                    fc.bias[0] = float("nan")
                else:  # finite, as after a huge lr, but every logit overflows
                    fc.weight.fill_(3e38)


@pytest.mark.parametrize(
    ("how", "message"),
    [("nan", r"weight model\.\w+\.bias is NaN or inf after step 4"), ("huge", r"are finite but their outputs")],
)
def test_a_save_refuses_weights_or_outputs_that_are_not_finite(tmp_path, how, message):
    folder = tmp_path / "checkpoints"
    callbacks = [RunCheckpoints(str(folder)), NonFiniteLossGuard(), CorruptAfterLastStep(epoch=1, how=how)]
    trainer = quiet_trainer(tmp_path, max_epochs=3, callbacks=callbacks, plugins=[AtomicCheckpointIO()])
    module = ClassificationModule("cifar_resnet110", model_options=TINY, num_classes=4)
    with pytest.raises(NonFiniteLossError, match=message):
        trainer.fit(module, datamodule=TensorData(*random_images(8), batch_size=4))
    assert ckpt_names(folder) == ["best.ckpt", "epoch000.ckpt", "last.ckpt"]  # nothing of epoch 1
    state = torch.load(folder / "last.ckpt", weights_only=True)
    assert state["global_step"] == 2
    assert all(v.isfinite().all() for v in state["state_dict"].values() if v.is_floating_point())


# --- 5 and 8: a kill -9 inside the save of last.ckpt -----------------------------------------------------------
KILLED_IN_SAVE = """
import os, signal, sys, torch
sys.path[:0] = [{repo!r}]
from classification.cli import run_cli
from tests.classification.test_module import RandomData

save = torch.save

def save_or_die(obj, f):
    if ".last.ckpt." in str(getattr(f, "name", f)):  # the atomic writer's temporary file for last.ckpt
        f.write(b"half a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    save(obj, f)

torch.set_num_threads(1)
torch.save = save_or_die
run_cli(RandomData, sys.argv[1:])
"""


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory) -> Path:
    """The output folder of a run killed (SIGKILL) while writing its first last.ckpt, after epoch000.ckpt."""
    root = tmp_path_factory.mktemp("killed")
    script = root / "killed_in_save.py"
    script.write_text(KILLED_IN_SAVE.format(repo=str(REPO)))
    run = subprocess.run(
        [sys.executable, str(script), *cli_args(root / "out", "--trainer.max_epochs=2")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == -9, run.stderr[-3000:]
    return root / "out"


def copy_of(killed_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(killed_run, out)  # copy2: the modification times stay those of the killed run
    return out


def test_resume_after_a_kill_between_the_epoch_file_and_last_ckpt(killed_run, tmp_path, capsys):
    out = copy_of(killed_run, tmp_path)
    assert "last.ckpt" not in ckpt_names(out / "checkpoints") and "epoch000.ckpt" in ckpt_names(out / "checkpoints")
    steps = CountSteps()
    cli = fit(out, "--trainer.max_epochs=2", "--ckpt_path=last", trainer_defaults={"callbacks": [steps]})
    said = capsys.readouterr().out
    assert f"resuming from {out / 'checkpoints/epoch000.ckpt'} (the newest complete checkpoint: no last.ckpt)" in said
    assert steps.steps == 2 and cli.trainer.global_step == 4  # epoch 1 only: epoch 0 came from the file


def test_a_new_run_removes_the_temporary_file_of_a_killed_save(killed_run, tmp_path, capsys):
    out = copy_of(killed_run, tmp_path)
    folder = out / "checkpoints"
    (stale,) = folder.glob(".last.ckpt.*.tmp")
    assert stale.read_bytes() == b"half a checkpoint"
    other = folder / ".notes.tmp"  # not the atomic writer's name: not ours to delete
    other.write_text("")
    busy = folder / ".last.ckpt.0123456789ab.tmp"  # newer than the run: a save in progress elsewhere
    busy.write_text("")
    future = time.time() + 3600
    os.utime(busy, (future, future))
    fit(out, "--trainer.max_epochs=1", "--trainer.limit_train_batches=0", "--trainer.limit_val_batches=0")
    assert f"removed 1 temporary file(s) of an interrupted save: {stale}" in capsys.readouterr().out
    assert not stale.exists() and other.exists() and busy.exists()


# --- 6: an output folder that cannot be written ------------------------------------------------------------------
class Setup(Callback):
    def __init__(self):
        self.called = False

    def setup(self, trainer, pl_module, stage):
        self.called = True


@pytest.mark.parametrize("blocked", ["checkpoints", "root"])
def test_an_unwritable_output_folder_fails_before_training(tmp_path, blocked):
    # a file where the folder should be (the tests run as root, for whom no permission bit blocks a write)
    root = tmp_path / "out"
    if blocked == "root":
        tmp_path.joinpath("file").write_text("")
        root = folder = tmp_path / "file/out"
    else:
        root.mkdir()
        (folder := root / "checkpoints").write_text("")
    started = Setup()
    with pytest.raises(OSError, match=rf"cannot write to the output folder \(.*\): '{folder}'"):
        fit(root, "--trainer.max_epochs=1", trainer_defaults={"callbacks": [started]})
    assert not started.called  # no data was read, no step trained


# --- 7: a full disk ----------------------------------------------------------------------------------------------
def digests(root: Path) -> dict[str, str]:
    files = [p for p in root.rglob("*") if p.is_file() and p.name != "config.yaml"]  # each run writes its own
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


class DiskFillsUp(Callback):
    """From the start of epoch `epoch` on, every file opened for writing under `root` is on a full disk."""

    def __init__(self, root: Path, epoch: int):
        self.root, self.epoch, self.full = root, epoch, False

    def on_train_epoch_start(self, trainer, pl_module):
        self.full = self.full or trainer.current_epoch == self.epoch


def test_a_full_disk_names_the_file_and_keeps_every_earlier_one(tmp_path, monkeypatch):
    root = tmp_path / "out"
    fit(root, "--trainer.max_epochs=1")
    before = digests(root)
    assert "curves.png" in before and "checkpoints/last.ckpt" in before

    real_open = builtins.open

    class FullDisk:
        """A file on a full disk: a few bytes go through, then ENOSPC."""

        def __init__(self, file):
            self.file = file

        def write(self, data):
            self.file.write(bytes(data)[:10])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def __getattr__(self, name):
            return getattr(self.file, name)

    disk = DiskFillsUp(root, epoch=1)

    def open_on_full_disk(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return FullDisk(f) if disk.full and "w" in mode and str(file).startswith(str(root)) else f

    monkeypatch.setattr(builtins, "open", open_on_full_disk)
    with pytest.raises(OSError) as raised, pytest.warns(UserWarning, match="training curves were not written"):
        fit(root, "--trainer.max_epochs=2", "--ckpt_path=last", trainer_defaults={"callbacks": [disk]})
    monkeypatch.undo()
    error = raised.value
    assert error.errno == errno.ENOSPC and Path(error.filename).parent == root / "checkpoints"
    assert Path(error.filename).name in ("best.ckpt", "epoch001.ckpt")  # the first save of epoch 1
    assert str(error).startswith("[Errno 28] No space left on device; nothing was replaced: ")
    assert digests(root) == before  # every earlier file as it was, curves.png included; no temporary file


# --- 10: messages that point at what exists ----------------------------------------------------------------
class Recipe:
    """A class pickled with the weights: only a full unpickling, which imports and runs code, restores it."""


def test_model_trusted_reaches_the_loader_and_the_refusal_names_it(tmp_path):
    source = create_model("cifar_resnet110", num_classes=4, **TINY)
    weights = tmp_path / "pickled.pth"
    torch.save({"state_dict": source.state_dict(), "recipe": Recipe()}, weights)  # loading it runs code
    data = TensorData(*random_images(8), batch_size=4)

    def validate(**kwargs) -> ClassificationModule:
        module = ClassificationModule(
            "cifar_resnet110", model_options=TINY, num_classes=4, pretrained=str(weights), **kwargs
        )
        quiet_trainer(tmp_path).validate(module, datamodule=data, verbose=False)
        return module

    with pytest.raises(UntrustedCheckpointError, match="--model.trusted true") as refused:
        validate()
    assert "--trusted " not in str(refused.value)
    torch.testing.assert_close(validate(trusted=True).model.state_dict(), source.state_dict(), atol=0, rtol=0)
    cli = ClassificationCLI(ClassificationModule, RandomData, args=["--model.trusted=true", TINY_ARG], run=False)
    assert cli.model.hparams.trusted is True


def test_non_finite_message_names_the_checkpoint_to_resume_or_says_there_is_none(tmp_path):
    folder = tmp_path / "checkpoints"

    def diverge(epoch: int) -> str:
        callbacks = [RunCheckpoints(str(folder)), NonFiniteLossGuard(), PoisonBatch(epoch=epoch, batch=0)]
        trainer = quiet_trainer(tmp_path, max_epochs=3, callbacks=callbacks, plugins=[AtomicCheckpointIO()])
        module = ClassificationModule("cifar_resnet110", model_options=TINY, num_classes=4)
        with pytest.raises(NonFiniteLossError) as raised:
            trainer.fit(module, datamodule=TensorData(*random_images(8), batch_size=4))
        return str(raised.value)

    message = diverge(epoch=0)
    assert "No checkpoint was saved before it: restart with a lower lr" in message and "last.ckpt" not in message
    message = diverge(epoch=1)
    assert f"{folder / 'last.ckpt'} holds the last good save and --ckpt_path last resumes from it" in message


@pytest.mark.parametrize(
    ("tool", "args", "message"),
    [
        ("train_cifar", ["--data.root", "/nonexistent"], "error: cifar10 not found: /nonexistent/cifar-10-batches-py"),
        ("train_imagenet", ["--ckpt_path", "/nowhere.ckpt"], "error: --ckpt_path /nowhere.ckpt: no such file"),
        ("train_places365", ["--model.pretrained", "/nowhere.pth"], "error: --model.pretrained /nowhere.pth: no such"),
    ],
)
def test_tools_report_a_bad_path_in_one_line(tmp_path, monkeypatch, tool, args, message):
    argv = [
        tool,
        "fit",
        "--trainer.max_epochs=1",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    monkeypatch.setattr(sys, "argv", [*argv, *args])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(REPO / f"tools/{tool}.py"), run_name="__main__")
    assert str(exited.value.code).startswith(message) and "\n" not in exited.value.code
