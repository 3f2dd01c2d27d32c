"""Checkpoint writes that never destroy the last good checkpoint: write a temp file in the same
directory, fsync, then atomically rename over the target. A failed write (full disk, kill) leaves the
previous file untouched; the temp file is removed on an error, and a kill's leftover temp is removed by
the next successful save in that directory. Resume ignores temp files.

Temp names never contain `ckpt_`: Lightning numbers the next SLURM checkpoint from the digits after
`ckpt_` in *every* file name of the directory, so `.hpc_ckpt_2.ckpt.tmp-4711` would make it
`hpc_ckpt_24712.ckpt`.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lit_ovis.errors import CheckpointError

TEMP_RE = re.compile(r"^\..+\.tmp-\d+$")  # ours, and the `.name.tmp-PID` files of earlier versions
HPC_RE = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")


def temp_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name.replace('ckpt_', 'ckpt-')}.tmp-{os.getpid()}")


class _WriteRecorder:
    """File wrapper that remembers the OSError of a failed write: torch.save turns it into an opaque
    RuntimeError ("enforce fail at inline_container.cc ... unexpected pos"), which hides ENOSPC."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.f.flush()


def _write_failed(path: Path, err: OSError) -> CheckpointError:
    reason = os.strerror(err.errno) if err.errno else str(err)
    kept = f"the previous checkpoint {path.name} is intact" if path.exists() else "no checkpoint was written"
    hint = "free disk space" if err.errno in (errno.ENOSPC, errno.EDQUOT) else f"check that {path.parent} is writable"
    return CheckpointError(f"could not write checkpoint {path} ({reason}); {kept}; {hint} and rerun the same command to resume")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    recorder, started = None, time.time()
    try:
        with open(tmp, "wb") as f:
            started = os.fstat(f.fileno()).st_mtime  # the file system's clock, as the stale temps' mtimes
            recorder = _WriteRecorder(f)
            torch.save(obj, recorder)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:  # noqa: BLE001 - whatever happened, the temp file must not stay
        tmp.unlink(missing_ok=True)
        cause = recorder.error if recorder is not None and recorder.error is not None else err
        if isinstance(cause, OSError):
            raise _write_failed(path, cause) from None
        raise
    remove_stale_temps(path.parent, older_than=started)
    prune_hpc_checkpoints(path)


def remove_stale_temps(directory: Path, older_than: float) -> list[Path]:
    """Delete temp files of earlier, killed writes (modified before this save started, so no live writer)."""
    removed = []
    for p in directory.iterdir():
        try:
            if TEMP_RE.match(p.name) and p.is_file() and p.stat().st_mtime < older_than:
                p.unlink()
                removed.append(p)
        except FileNotFoundError:  # another process cleaned it first
            pass
    return removed


def prune_hpc_checkpoints(path: Path) -> list[Path]:
    """After `hpc_ckpt_N.ckpt` is complete, older `hpc_ckpt_M.ckpt` (M < N) only take space: delete them."""
    m = HPC_RE.match(path.name)
    if not m:
        return []
    removed = []
    for p in path.parent.iterdir():
        old = HPC_RE.match(p.name)
        if old and int(old.group(1)) < int(m.group(1)) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        if not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path)  # object stores write whole objects atomically
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile) as err:
            raise CheckpointError(f"checkpoint '{path}' is corrupt ({type(err).__name__}); pass another --ckpt_path or `null` to start fresh") from None
        except RuntimeError as err:
            if "PytorchStreamReader" not in str(err):  # torch's wording for a damaged zip record
                raise
            raise CheckpointError(f"checkpoint '{path}' is corrupt ({str(err).splitlines()[0]}); pass another --ckpt_path or `null` to start fresh") from None
