"""The checkpoints of a classification run, in `<trainer.default_root_dir>/checkpoints`, and what keeps them whole.

- `RunCheckpoints` (the CLI's `--checkpoint.*`): what is kept, last.ckpt, best.ckpt and epochNNN.ckpt;
- `AtomicCheckpointIO`: every save all-or-nothing; a full disk names the checkpoint it could not write;
- `resume_checkpoint`: what `--ckpt_path last` resumes, last.ckpt or else the newest complete checkpoint;
- `check_writable`: an output folder that cannot be written fails before training, not at the first save.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from backbones.fileio.atomic import atomic_write


class RunCheckpoints(ModelCheckpoint):
    """The checkpoints of a run, all in `dirpath`:

    - `last.ckpt` at the end of every epoch (of every validation, when validation does not run once an epoch);
      a ModelCheckpoint in `trainer.callbacks` may refresh it every N steps too (the long recipes do);
    - `best.ckpt`: the lowest `monitor` so far (`mode="max"`: the highest), replaced when it improves; none
      when `monitor` is null or nothing is validated;
    - `epoch{NNN}.ckpt` every `every_n_epochs` epochs (epoch counted from 0), never deleted.
    `NonFiniteLossGuard` refuses a save whose loss, weights or outputs are not finite. A rerun in the same folder
    replaces these files (no `-v1` versions).

    Args:
        dirpath: the folder (the CLI sets `<trainer.default_root_dir>/checkpoints`).
        every_n_epochs: epochs between kept `epoch{NNN}.ckpt` files: 1 keeps every epoch, 0 none.
        monitor: the logged metric best.ckpt minimises (maximises with `mode="max"`); null: no best.ckpt.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        every_n_epochs: int = 1,
        monitor: str | None = "val/top1_error",
        mode: Literal["min", "max"] = "min",
    ):
        if every_n_epochs < 0:
            raise ValueError(f"every_n_epochs={every_n_epochs} must be >= 0 (0 keeps no epoch files)")
        # Lightning's every_n_epochs says when to save (every epoch: last.ckpt); ours, which epoch files to keep
        super().__init__(
            dirpath,
            filename="best",
            monitor=monitor,
            mode=mode,
            save_top_k=1 if monitor else 0,
            save_last=True,
            every_n_epochs=1,
            enable_version_counter=False,
        )
        self.keep_every_n_epochs = every_n_epochs

    # Lightning calls this at every epoch end (or validation end) only: this callback has no step trigger
    def _save_topk_checkpoint(self, trainer: Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        super()._save_topk_checkpoint(trainer, monitor_candidates)  # best.ckpt, when the score improved
        epoch = trainer.current_epoch
        if self.keep_every_n_epochs and (epoch + 1) % self.keep_every_n_epochs == 0:
            self._save_checkpoint(trainer, os.path.join(self.dirpath, f"epoch{epoch:03d}{self.FILE_EXTENSION}"))
        # Lightning writes last.ckpt only after another file of this step; with a monitor, only on improvement
        self._last_global_step_saved = trainer.global_step


class _WriteErrors:
    """A file that keeps the OSError of its failed write: torch.save reports it only as "unexpected pos N vs M"."""

    def __init__(self, file: Any):
        self.file, self.error = file, None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


def _torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        out = _WriteErrors(f)
        try:
            torch.save(obj, out)
        except RuntimeError as e:
            if out.error is None:
                raise
            raise out.error from e  # the atomic writer names the destination in it


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose saves are all-or-nothing: a crash mid-save leaves the previous file intact.

    Through `backbones.fileio.atomic.atomic_write` (a flushed temporary file in the destination folder, then a
    rename). Lightning's own save streams into the destination (or through a temp file that may sit on
    another disk). A failed write (a full disk, a quota) raises the OSError, naming the checkpoint.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        atomic_write(path, lambda tmp: _torch_save(checkpoint, tmp))


def checkpoint_folders(trainer: Trainer) -> list[Path]:
    """The folders the trainer's ModelCheckpoints write to (those with a folder), without repeats."""
    callbacks = trainer.checkpoint_callbacks
    return list(dict.fromkeys(Path(cb.dirpath) for cb in callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath))


def resume_checkpoint(folders: Iterable[Path]) -> Path | None:
    """What `--ckpt_path last` resumes: the newest complete last*.ckpt, else the newest complete checkpoint.

    Complete: a whole zip archive (torch's format, whose directory is written last), so never a file cut short
    by a writer that is not atomic. A kill between an epoch's files leaves epochNNN.ckpt without last.ckpt:
    resuming from it loses nothing.
    """
    files = [p for folder in folders if folder.is_dir() for p in folder.glob("*.ckpt")]
    complete = [p for p in files if p.is_file() and zipfile.is_zipfile(p)]
    # best.ckpt is written first at an epoch's end: on a coarse clock's tie, the epoch file is the newer
    return max(
        complete, key=lambda p: (p.name.startswith("last"), p.stat().st_mtime_ns, p.name != "best.ckpt"), default=None
    )


def check_writable(folder: Path) -> None:
    """Create `folder` and a file in it, or raise an OSError naming the folder."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):  # access() is not enough: read-only mounts, ACLs, quotas
            pass
    except OSError as e:
        raise OSError(e.errno, f"cannot write to the output folder ({e.strerror})", str(folder)) from e
