"""Files and paths shared by every writer and reader: atomic writes, remote roots and weight sources.

Atomic write: the data goes to a hidden temp file beside the target (`.<name>.tmp-<pid>`), is flushed to disk
(fsync), then renamed over the target, so a reader (or a resumed job) sees the old or the new file, never a
truncated one; the temp file is removed on any error. Training checkpoints have their own variant
(`lit_ovis.checkpoint_io`: it also reports a full disk in one line and never puts `ckpt_` in a temp name).
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from lit_ovis.errors import CheckpointError

# URL schemes LitData / fsspec stream from; `local:` is LitData's prefix for a local cache of a remote root.
REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "az://", "abfs://", "hf://", "http://", "https://", "local:")


# A hub id (`org/name`) is fetched, not opened: it cannot be checked offline, a missing local path can.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
WEIGHT_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth", ".bin")


def is_remote(path: Any) -> bool:
    return isinstance(path, str) and path.startswith(REMOTE_SCHEMES)


def could_be_hub_id(source: str) -> bool:
    return bool(HUB_ID.match(source)) and not source.endswith(WEIGHT_SUFFIXES)


def check_weights_source(source: str, what: str) -> bool:
    """True when `source` is a local file or folder; False when it can only be a hub id (`org/name`). Anything
    else is a mistyped local path: one line saying it does not exist (the hub libraries would call it a
    malformed repo id)."""
    if os.path.exists(source):
        return True
    if could_be_hub_id(source) or is_remote(source):
        return False
    raise CheckpointError(f"{what}: '{source}' does not exist (no such file or folder, and not a hub id such as "
                          "AIDC-AI/Ovis-Image-7B); fix the path")


def hub_load_failure(source: str, error: BaseException) -> str:
    """How to describe a failed `from_pretrained(source)`: a hub-id-shaped name with no local folder may just
    be a mistyped path, so say both."""
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    if os.path.exists(source):
        return first
    return f"no such local folder, and no hub model '{source}' in the local cache: {first}"


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path to write `path`'s content to; on success it is fsynced and renamed over `path`."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write bytes or UTF-8 text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    atomic_write(path, json.dumps(obj, indent=indent, ensure_ascii=False))
