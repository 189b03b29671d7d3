"""Reading checkpoint files safely: torch zips and legacy files, safetensors (+ our JSON record), pickles.

Files are unpickled with `weights_only=True` (plain pickles with a numpy-only unpickler) unless the caller
passes `trusted=True`; the format is sniffed from the content, not the suffix. Nothing is downloaded unless
the source is a URL the caller gave. Every error names the file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import pickle
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..fileio.unpickle import ForbiddenGlobal, NumpyUnpickler

log = logging.getLogger(__name__)

RECORD_FORMAT = "senet-suite/1"  # the "format" field of our JSON sidecar and of the detectron2 "__senet__" entry
URL_SCHEMES = ("http", "https", "file")
# torch's pickled magic number (LONG1 opcode, 10 bytes) opens a legacy (pre-zip) torch.save file, after the
# protocol header and, from pickle_protocol=4 on, a frame header; any other pickle is a plain pickle
_TORCH_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
# timm training checkpoints keep their argparse options in `args`: harmless to rebuild, so allowed
_SAFE_GLOBALS = [argparse.Namespace]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or whose weights do not fit the model. The message names the file."""


class UntrustedCheckpointError(CheckpointError):
    """A pickle that needs arbitrary code to load; only `trusted=True` opens it."""


@dataclass
class Checkpoint:
    """Every tensor of a checkpoint file, nested containers flattened with "." (`state_dict.model.conv1.weight`).

    `record` is our architecture/preprocessing record (JSON sidecar or detectron2 "__senet__"), else None.
    """

    path: str
    file_format: str  # "ours", "safetensors", "torch", "detectron2", "pickle" or "in-memory"
    tensors: dict[str, torch.Tensor]
    record: dict | None = None


def read_checkpoint(source: Any, *, map_location: Any = "cpu", trusted: bool = False) -> Checkpoint:
    """Read a checkpoint file, URL or in-memory state dict into a `Checkpoint`; the format is sniffed from content."""
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, Mapping):
        return Checkpoint("<state dict>", "in-memory", _flatten(source))
    if not isinstance(source, str | os.PathLike):
        raise TypeError(f"pretrained source must be a path, URL or state dict, got {type(source).__name__}")
    text = os.fspath(source)
    path = _fetch_url(text) if urllib.parse.urlparse(text).scheme in URL_SCHEMES else Path(text)
    if path.is_dir():
        raise CheckpointError(f"{path}: a directory, not a checkpoint file (name the file inside it)")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(32)
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty, not a checkpoint")
    if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and _TORCH_LEGACY_MAGIC in head):
        obj = _torch_load(path, map_location, trusted)
        return Checkpoint(str(path), "torch", _flatten(_expect_mapping(obj, path)))
    if head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 27:  # header length, then JSON header
        return _read_safetensors(path)
    if head[:1] == b"\x80":
        return _read_pickle(path, trusted)
    raise CheckpointError(
        f"{path}: not a checkpoint (expected a torch .pth/.pt/.bin/.ckpt, safetensors or pickle file); "
        f"it starts with {head[:8]!r}"
    )


def _fetch_url(url: str) -> Path:
    """Download a URL the caller passed into the torch hub cache (once; the download is written atomically)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return Path(urllib.parse.unquote(parsed.path))
    # by base name alone, .../v1/model.pth and .../v2/model.pth would share one cached file
    name = Path(parsed.path).name or "checkpoint"
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    dst = Path(torch.hub.get_dir()) / "checkpoints" / f"{Path(name).stem}-{digest}{Path(name).suffix}"
    if not dst.is_file():
        log.info("downloading %s to %s", url, dst)
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(dst), progress=False)
        except OSError as e:  # URLError and HTTPError included; their text does not name the URL
            raise CheckpointError(f"{url}: download to {dst} failed: {e}") from e
    return dst


def _torch_load(path: Path, map_location: Any, trusted: bool) -> Any:
    try:
        if trusted:
            return torch.load(path, map_location=map_location, weights_only=False)
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise CheckpointError(f"{path}: corrupt torch checkpoint ({e})") from e
        raise _untrusted(path, _unsafe_globals(path, str(e)), _weights_only_reason(str(e))) from e
    except Exception as e:  # zip, EOF and storage errors of truncated or damaged files
        raise CheckpointError(f"{path}: cannot read it as a torch checkpoint (truncated or corrupt?): {_why(e)}") from e


def _unsafe_globals(path: Path, message: str) -> list[str]:
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # legacy (non-zip) files: fall back to what the unpickler reported
        return re.findall(r"GLOBAL ([\w.]+)", message)


def _weights_only_reason(message: str) -> str:
    """torch's own reason inside its long weights-only error, e.g. "Unsupported operand 149"."""
    m = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\s*\n|$)", message, re.DOTALL)
    return " ".join((m[1] if m else message).split())


def _untrusted(path: Path, names: Iterable[str], reason: str = "") -> UntrustedCheckpointError:
    names = list(names)
    # without a forbidden global the file may hold only tensors in a form the weights-only unpickler cannot
    # read (pickle protocol 4 framing): say what torch said rather than guess at code
    why = (
        f"it needs code outside plain tensors and containers ({', '.join(names)}), and unpickling runs that code"
        if names
        else f"torch's weights-only unpickler cannot read it ({reason or 'no reason given'}), and a full "
        "unpickling could run code"
    )
    return UntrustedCheckpointError(
        f"{path}: refused to unpickle it: {why}. Pass trusted=True (--trusted on the command line) only if you "
        "trust the source of this file."
    )


def _read_safetensors(path: Path) -> Checkpoint:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read it as safetensors (truncated or corrupt?): {_why(e)}") from e
    record = _read_sidecar(path, metadata)
    return Checkpoint(str(path), "ours" if record else "safetensors", tensors, record)


def _read_sidecar(path: Path, metadata: Mapping[str, str]) -> dict | None:
    """Our JSON record beside `path`, checked to describe this very file (a write cut in half would not)."""
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        return None
    try:
        record = json.loads(sidecar.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{sidecar}: unreadable checkpoint record (corrupt JSON?): {e}") from e
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        return None  # some other tool's JSON: the safetensors file stands alone
    if record.get("checkpoint_id") != metadata.get("checkpoint_id"):
        raise CheckpointError(
            f"{sidecar} does not describe {path} (checkpoint ids {record.get('checkpoint_id')!r} and "
            f"{metadata.get('checkpoint_id')!r} differ): was a write interrupted? Convert the checkpoint again."
        )
    return record


def _read_pickle(path: Path, trusted: bool) -> Checkpoint:
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="latin1") if trusted else NumpyUnpickler(f, encoding="latin1").load()
    except ForbiddenGlobal as e:
        raise _untrusted(path, [str(e)]) from e
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read it as a pickle (truncated or corrupt?): {_why(e)}") from e
    obj = _expect_mapping(obj, path)
    is_detectron2 = "__author__" in obj and "model" in obj
    record = obj.get("__senet__") if isinstance(obj.get("__senet__"), dict) else None
    return Checkpoint(str(path), "detectron2" if is_detectron2 else "pickle", _flatten(obj), record)


def _expect_mapping(obj: Any, path: Path) -> Mapping:
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: expected a state dict (a mapping of names to tensors), found {type(obj).__name__}"
        )
    return obj


def _flatten(obj: Mapping, prefix: str = "") -> dict[str, torch.Tensor]:
    """All tensors (and numpy arrays) in nested mappings, keyed by their dotted path; other values are skipped."""
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            out[name] = value
        elif isinstance(value, np.ndarray) and value.dtype.kind in "fiub":
            out[name] = torch.from_numpy(np.array(value))
        elif isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
    return out


def _why(error: Exception) -> str:
    return f"{type(error).__name__}: {error}".rstrip(": ")
