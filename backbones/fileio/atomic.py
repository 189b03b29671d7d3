"""All-or-nothing file writes, for every file the project writes that a later run reads back.

Checkpoints (ours, detectron2's, Lightning's), metrics, benchmark reports and the synthetic datasets go to a
hidden temporary file in the destination folder (same file system), are flushed to disk, and then replace the
destination with `os.replace`, atomic on POSIX and Windows. A crash or an exception before the rename leaves
the destination as it was (a previous checkpoint stays loadable) and no temporary file behind; an OSError
(a full disk, a quota) names the destination, not the temporary file. Only a kill -9 or a power cut mid-write
leaves a temporary file: `remove_stale_temp_files` deletes those at the next run's start.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

# the temporary names `staged` gives, and nothing else: `.<destination name>.<12 hex digits>.tmp`
TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")


class staged:
    """`write(tmp)` into a temporary sibling of `path` on entering; the returned `commit()` renames it into place.

    Two files that must change together stage both, then commit in the order whose cut is safe. Leaving the
    block without committing deletes the temporary file. The temporary name ends in ".tmp" (never a checkpoint
    name that a "last*.ckpt" search finds) and gets the umask's permissions: mkstemp's, and safetensors' own
    staging, are 0600, which other users and containers cannot read.
    """

    def __init__(self, path: str | os.PathLike, write: Callable[[Path], Any]):
        self.path, self.write = Path(path), write
        self.tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:12]}.tmp")

    def __enter__(self) -> Callable[[], None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            mode = os.fstat(fd).st_mode & 0o777
            os.close(fd)
            self.write(self.tmp)
            os.chmod(self.tmp, mode)  # a writer that replaced the file may have left its own mode
            with open(self.tmp, "r+b") as f:
                os.fsync(f.fileno())  # the data reaches the disk before the rename can: a crash leaves no stub
        except OSError as e:
            self.tmp.unlink(missing_ok=True)
            if e.errno is None or (e.filename is not None and str(e.filename) != str(self.tmp)):
                raise
            # the temporary name means nothing to the user (torch.save's "unexpected pos" still less): name the
            # destination, which is as it was
            raise OSError(e.errno, f"{e.strerror}; nothing was replaced", str(self.path)) from e
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise
        return self._commit

    def _commit(self) -> None:
        os.replace(self.tmp, self.path)
        _fsync_dir(self.path.parent)

    def __exit__(self, *exc) -> None:
        self.tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """`write(tmp)`, then rename the result over `path` in one step; -> `path`."""
    with staged(path, write) as commit:
        commit()
    return Path(path)


def remove_stale_temp_files(folder: str | os.PathLike, before: float) -> list[Path]:
    """Delete the temporary files `staged` left in `folder` (a kill -9 mid-write) last modified before `before`.

    Only names of `staged`'s own pattern are touched; `before` (a time.time(), the start of the run that calls
    this) spares the temporary files of a save in progress. -> the removed paths.
    """
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            with contextlib.suppress(FileNotFoundError):  # another process may remove it first
                if TEMP_NAME.fullmatch(entry.name) and entry.is_file() and entry.stat().st_mtime < before:
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself (POSIX); not possible and not needed on Windows."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # some network and FUSE file systems refuse it; the file is safe
            os.fsync(fd)
    finally:
        os.close(fd)
