"""Checkpoint writes that never destroy the last good checkpoint: write a temp file in the same
directory, fsync, then atomically rename over the target. A failed write (full disk, kill) leaves the
previous file untouched and only a temp file behind, which resume ignores and the next save replaces."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lit_ovis.errors import CheckpointError


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        hint = "free disk space" if err.errno == errno.ENOSPC else "check the directory"
        raise CheckpointError(
            f"could not write checkpoint {path} ({os.strerror(err.errno) if err.errno else err}); "
            f"the previous checkpoint is intact; {hint} and rerun the same command to resume"
        ) from None


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        if not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path)  # object stores write whole objects atomically
        atomic_torch_save(checkpoint, path)
