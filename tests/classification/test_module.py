"""The shared classification LightningModule and CLI: schedules, metrics, fault handling, atomic checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningDataModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import classification.cli as cli_module
from backbones import create_model
from classification.callbacks import NonFiniteLossError, NonFiniteLossGuard, TrainingCurves
from classification.cli import AtomicCheckpointIO, ClassificationCLI, batch_summary
from classification.loaders import EpochRandomSampler, ResumableDataLoader
from classification.module import ClassificationModule, LrSchedule, param_groups

TINY = {"depth_per_stage": 1, "widths": (8, 16, 32), "stem_width": 8}


pytestmark = pytest.mark.usefixtures("one_thread")


class Identity(nn.Module):
    """A 'network' whose input is its output: the batch carries the logits, so metrics can be checked exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class TensorData(LightningDataModule):
    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=False)

    val_dataloader = test_dataloader = train_dataloader


class RandomData(TensorData):
    """TensorData with typed arguments, for LightningCLI."""

    def __init__(self, n: int = 8, batch_size: int = 4):
        super().__init__(*random_images(n), batch_size=batch_size)


def quiet_trainer(tmp_path: Path, **kw) -> Trainer:
    kw = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False, **kw}
    return Trainer(accelerator="cpu", devices=1, default_root_dir=tmp_path, **kw)


def test_he_resnet110_schedule_warmup_and_steps():
    # He et al. ResNet-110: 0.01 for 400 iterations, then 0.1, /10 at 32k and 48k
    s = LrSchedule("multistep", (32000, 48000), 0.1, warmup=400, warmup_mode="constant", warmup_factor=0.1)
    lr = {t: 0.1 * s(t) for t in (0, 399, 400, 31999, 32000, 47999, 48000, 63999)}
    expected = {0: 0.01, 399: 0.01, 400: 0.1, 31999: 0.1, 32000: 0.01, 47999: 0.01, 48000: 0.001, 63999: 0.001}
    assert lr == pytest.approx(expected)


def test_linear_warmup_and_cosine():
    s = LrSchedule("cosine", warmup=10, warmup_mode="linear", warmup_factor=0.1, total=110, min_factor=0.01)
    assert s(0) == pytest.approx(0.1)
    assert s(5) == pytest.approx(0.55)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.01 + 0.99 * 0.5)  # halfway through the cosine
    assert s(110) == pytest.approx(0.01)
    wrn = LrSchedule("multistep", (60, 120, 160), 0.2)
    assert [wrn(e) for e in (59, 60, 120, 160, 199)] == pytest.approx([1, 0.2, 0.04, 0.008, 0.008])


def test_cosine_over_epochs_needs_max_epochs(tmp_path):
    module = ClassificationModule(Identity(), num_classes=4, schedule="cosine", interval="epoch")
    module.trainer = quiet_trainer(tmp_path, max_epochs=-1, max_steps=10)  # as fit resolves max_steps alone
    with pytest.raises(ValueError, match="needs trainer.max_epochs"):
        module.configure_optimizers()
    module.trainer = quiet_trainer(tmp_path, max_epochs=4)
    assert module.lr_schedule().total == 4


def test_optimizer_from_hparams_and_no_weight_decay_on_bn_bias(tmp_path):
    module = ClassificationModule(
        "cifar_resnet110", model_options=TINY, lr=0.1, nesterov=True, weight_decay=5e-4, no_wd_on_bn_bias=True
    )
    groups = param_groups(module.model, 5e-4, True)
    no_decay = {id(p) for p in groups[1]["params"]}
    for name, p in module.model.named_parameters():
        is_bn_or_bias = name.endswith(".bias") or ".bn" in name or name.startswith("bn")
        assert (id(p) in no_decay) == is_bn_or_bias, name
    assert groups[1]["weight_decay"] == 0.0 and groups[0]["weight_decay"] == 5e-4
    module.trainer = quiet_trainer(tmp_path, max_epochs=1)
    config = module.configure_optimizers()
    sgd = config["optimizer"]
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9 and sgd.defaults["lr"] == 0.1
    assert config["lr_scheduler"]["interval"] == "epoch"


def test_label_smoothing_loss_matches_formula():
    module = ClassificationModule(Identity(), num_classes=5, label_smoothing=0.1)
    logits = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    logp = logits.log_softmax(1)
    # (1 - eps) * NLL + eps * mean over classes of -log p
    expected = (0.9 * -logp[torch.arange(7), target] + 0.1 * -logp.mean(1)).mean()
    assert module.loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)


def test_top1_top5_error_equal_hand_computation(tmp_path):
    # 4 samples, 6 classes; the rank of the target among the logits: 1, 2, 6, 5
    logits = torch.tensor(
        [
            [9.0, 1, 2, 3, 4, 5],  # target 0 ranks 1st: top-1 right, top-5 right
            [1.0, 9, 8, 3, 4, 5],  # target 2 ranks 2nd: top-1 wrong, top-5 right
            [6.0, 5, 4, 3, 2, 1],  # target 5 ranks 6th: both wrong
            [6.0, 5, 4, 3, 2, 1],  # target 4 ranks 5th: top-1 wrong, top-5 right
        ]
    )
    target = torch.tensor([0, 2, 5, 4])
    # and 50 random samples with 10 classes, checked against a numpy ranking
    rng = np.random.default_rng(0)
    rand_logits = torch.from_numpy(rng.normal(size=(50, 10)).astype(np.float32))
    rand_target = torch.from_numpy(rng.integers(0, 10, 50))
    order = np.argsort(-rand_logits.numpy(), axis=1)
    rank = np.argmax(order == rand_target.numpy()[:, None], axis=1)
    hand = {"top1": 100 * np.mean(rank >= 1), "top5": 100 * np.mean(rank >= 5)}

    for x, y, classes, expected in [
        (logits, target, 6, {"top1": 75.0, "top5": 25.0}),
        (rand_logits, rand_target, 10, hand),
    ]:
        module = ClassificationModule(Identity(), num_classes=classes)
        trainer = quiet_trainer(tmp_path)
        data = TensorData(x, y, batch_size=3)  # several batches: the metric must accumulate, not average
        val = trainer.validate(module, datamodule=data, verbose=False)[0]
        test = trainer.test(module, datamodule=data, verbose=False)[0]
        for k in ("top1", "top5"):
            assert val[f"val/{k}_error"] == pytest.approx(expected[k])
            assert test[f"test/{k}_error"] == pytest.approx(expected[k])
        assert val["val/loss"] == pytest.approx(F.cross_entropy(x, y).item(), rel=1e-5)


class PoisonBatch(Callback):
    """Turns one training batch into NaNs, as a data or overflow fault would."""

    def __init__(self, epoch: int, batch: int):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            batch[0].fill_(float("nan"))


def random_images(n: int = 32, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, classes, (n,), generator=g)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    data = TensorData(*random_images(), batch_size=8)
    ckpt_dir = tmp_path / "checkpoints"

    def trainer(epochs: int, callbacks=()) -> Trainer:
        checkpoint = cli_module.ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_epochs=1)
        callbacks = [checkpoint, NonFiniteLossGuard(), *callbacks]
        return quiet_trainer(tmp_path, max_epochs=epochs, callbacks=callbacks, plugins=[AtomicCheckpointIO()])

    module = ClassificationModule("cifar_resnet110", model_options=TINY, num_classes=4)
    with pytest.raises(NonFiniteLossError, match=r"training loss is nan at epoch 1, batch 2"):
        trainer(3, [PoisonBatch(epoch=1, batch=2)]).fit(module, datamodule=data)
    last = ckpt_dir / "last.ckpt"
    state = torch.load(last, weights_only=True)  # loads, and runs no code
    assert state["epoch"] == 0 and state["global_step"] == 4  # the end of epoch 0, the last good state
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    assert not list(ckpt_dir.glob("*.tmp"))
    # ... and resumable: the fault does not recur without the poisoned batch
    resumed = ClassificationModule("cifar_resnet110", model_options=TINY, num_classes=4)
    t = trainer(2)
    t.fit(resumed, datamodule=data, ckpt_path=str(last))
    assert t.global_step == 8


def test_non_finite_loss_never_reaches_a_step_checkpoint(tmp_path):
    # the periodic read-back is far away and there is no validation: only the save itself can catch it
    data = TensorData(*random_images(), batch_size=8)
    ckpt_dir = tmp_path / "checkpoints"
    checkpoint = cli_module.ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=1)
    guard = NonFiniteLossGuard(check_every=1000)
    trainer = quiet_trainer(
        tmp_path, max_epochs=2, limit_val_batches=0, callbacks=[checkpoint, guard, PoisonBatch(epoch=0, batch=2)]
    )
    module = ClassificationModule("cifar_resnet110", model_options=TINY, num_classes=4)
    with pytest.raises(NonFiniteLossError, match=r"training loss is nan at epoch 0, batch 2 \(global step 2;"):
        trainer.fit(module, datamodule=data)
    state = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert state["global_step"] == 2  # saved after the last good step
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def test_finite_check_reads_back_every_n_batches(tmp_path):
    """The loss is not read back at every step (that would stall the host on the device each time)."""
    module = ClassificationModule("cifar_resnet110", model_options=TINY, num_classes=4)
    guard = NonFiniteLossGuard(check_every=3)
    trainer = quiet_trainer(tmp_path, max_epochs=2, limit_val_batches=0, enable_checkpointing=False, callbacks=[guard])
    reduce, reads = trainer.strategy.reduce, []

    def counting_reduce(tensor, *args, **kwargs):
        if kwargs.get("reduce_op") == "min":  # Lightning's own reductions are sums and means
            reads.append(trainer.global_step)
        return reduce(tensor, *args, **kwargs)

    trainer.strategy.reduce = counting_reduce
    trainer.fit(module, datamodule=TensorData(*random_images(16), batch_size=2))  # 8 batches an epoch
    assert reads == [3, 6, 8, 11, 14, 16]  # every 3 batches, and at each epoch end

    trainer = quiet_trainer(
        tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[guard, PoisonBatch(epoch=0, batch=4)]
    )
    with pytest.raises(NonFiniteLossError, match=r"at epoch 0, batch 4 \(global step 4; found at step 6,"):
        trainer.fit(module, datamodule=TensorData(*random_images(16), batch_size=2))


def test_resume_and_load_from_checkpoint_do_not_need_the_pretrained_file(tmp_path):
    source = create_model("cifar_resnet110", num_classes=4, **TINY)
    weights = tmp_path / "pretrained.pth"
    torch.save(source.state_dict(), weights)
    data = TensorData(*random_images(), batch_size=8)

    def module() -> ClassificationModule:
        return ClassificationModule("cifar_resnet110", model_options=TINY, num_classes=4, pretrained=str(weights))

    def fit(root: Path, callbacks=(), ckpt_path=None) -> ClassificationModule:
        checkpoint = cli_module.ModelCheckpoint(dirpath=root / "checkpoints", save_last=True)
        trainer = quiet_trainer(root, max_epochs=3, callbacks=[checkpoint, NonFiniteLossGuard(), *callbacks])
        fitted = module()
        trainer.fit(fitted, datamodule=data, ckpt_path=ckpt_path)
        return fitted

    fresh = module()
    quiet_trainer(tmp_path).validate(fresh, datamodule=data, verbose=False)  # no checkpoint: the file is loaded
    torch.testing.assert_close(fresh.model.state_dict(), source.state_dict(), atol=0, rtol=0)
    straight = fit(tmp_path / "straight")
    with pytest.raises(NonFiniteLossError):  # a fault in epoch 2: last.ckpt holds the end of epoch 1
        fit(tmp_path / "split", [PoisonBatch(epoch=2, batch=0)])
    weights.unlink()  # moved or deleted between the runs
    resumed = fit(tmp_path / "split", ckpt_path="last")
    torch.testing.assert_close(resumed.state_dict(), straight.state_dict(), atol=0, rtol=0)
    loaded = ClassificationModule.load_from_checkpoint(tmp_path / "split/checkpoints/last.ckpt", weights_only=True)
    torch.testing.assert_close(loaded.state_dict(), straight.state_dict(), atol=0, rtol=0)
    quiet_trainer(tmp_path).validate(loaded, datamodule=data, verbose=False)  # and validates without the file


def test_atomic_checkpoint_write_survives_a_crash(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpt" / "last.ckpt"
    io.save_checkpoint({"w": torch.ones(3)}, path)
    before = path.read_bytes()
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert path.stat().st_mode == plain.stat().st_mode  # the umask's permissions, as torch.save would give

    def crash_midway(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # e.g. the job was killed while writing

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"w": torch.zeros(3)}, path)
    assert path.read_bytes() == before  # the previous checkpoint is untouched
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # and no temp file is left
    monkeypatch.undo()
    io.save_checkpoint({"w": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.zeros(3))


def test_cli_wires_atomic_io_loggers_checkpoint_and_curves(tmp_path):
    cli = ClassificationCLI(
        ClassificationModule,
        RandomData,
        args=["--model.model_options={depth_per_stage: 1}", f"--trainer.default_root_dir={tmp_path}"],
        run=False,
    )
    trainer = cli.trainer
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert [type(lg).__name__ for lg in trainer.loggers] == ["CSVLogger", "TensorBoardLogger"]
    checkpoint = trainer.checkpoint_callback
    assert checkpoint.save_last and Path(checkpoint.dirpath) == tmp_path / "checkpoints"
    assert any(isinstance(cb, TrainingCurves) for cb in trainer.callbacks)
    assert any(isinstance(cb, NonFiniteLossGuard) for cb in trainer.callbacks)


def test_batch_summary_states_the_global_batch_and_its_lr(tmp_path):
    # batch_size is per device: one optimizer step sees it times devices, nodes and accumulated batches
    trainer = Trainer(
        accelerator="cpu", devices=4, strategy="ddp", num_nodes=2, accumulate_grad_batches=2, logger=False
    )
    assert batch_summary(trainer, 32, 0.1) == (
        "batch: 32 per device x 4 device(s) x 2 node(s) x 2 accumulated = 512 images per optimizer step, "
        "at lr 0.1 (0.05 per 256 images)"
    )


def test_training_curves_png_and_state(tmp_path):
    curves = TrainingCurves()
    curves.history = {"train/loss_epoch": [(0, 2.0), (1, 1.5)], "val/top1_error": [(0, 80.0), (1, math.nan)]}
    curves.last_val_step = 7
    restored = TrainingCurves()
    restored.load_state_dict(curves.state_dict())
    assert restored.history["train/loss_epoch"] == [(0, 2.0), (1, 1.5)] and restored.last_val_step == 7
    png = restored.plot(tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fit_ending_mid_epoch_validates_the_final_weights(tmp_path, capsys):
    # 8 images in batches of 4: 2 steps per epoch; max_steps=3 stops one step into the second epoch
    cli = ClassificationCLI(
        ClassificationModule,
        RandomData,
        args=[
            "fit",
            "--model.model_options={depth_per_stage: 1, widths: [8, 16, 32], stem_width: 8}",
            "--trainer.max_steps=3",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
    )
    assert cli.trainer.global_step == 3
    out = capsys.readouterr().out
    assert "ended at step 3, after the last validation" in out and "validation error: top-1" in out
    assert "final validation error" not in out  # the epoch-1 validation is stale, so not reported as final
    assert (tmp_path / "curves.png").is_file()


def test_resumable_loader_continues_the_epoch_of_its_state():
    data = TensorDataset(torch.arange(12))

    def loader(workers: int = 0) -> ResumableDataLoader:
        sampler = EpochRandomSampler(data, seed=3)
        return ResumableDataLoader(data, batch_size=2, sampler=sampler, num_workers=workers)

    def resume(state: dict, epoch: int) -> list[list[int]]:
        # Lightning's order: a new loader, its state, iter(), set_epoch, then the batches; workers start in iter()
        resumed = loader(workers=2)
        resumed.load_state_dict(state)
        batches = iter(resumed)
        resumed.sampler.set_epoch(epoch)
        return [b.tolist() for (b,) in batches]

    straight = loader()
    epochs = []
    for epoch in range(2):
        straight.sampler.set_epoch(epoch)
        epochs.append([b.tolist() for (b,) in straight])
    assert straight.state_dict() == {"epoch": 1, "batches": 6} and epochs[0] != epochs[1]
    interrupted = loader()
    interrupted.sampler.set_epoch(1)
    batches = iter(interrupted)
    next(batches), next(batches)
    assert interrupted.state_dict() == {"epoch": 1, "batches": 2}
    assert resume(interrupted.state_dict(), epoch=1) == epochs[1][2:]
    # a checkpoint written at an epoch's end resumes in the next epoch, which starts from its beginning
    assert resume({"epoch": 0, "batches": 6}, epoch=1) == epochs[1]
