"""Files and paths shared by every writer and reader: atomic writes and remote roots.

Atomic write: the data goes to a hidden temp file beside the target (`.<name>.tmp-<pid>`), is flushed to disk
(fsync), then renamed over the target, so a reader (or a resumed job) sees the old or the new file, never a
truncated one; the temp file is removed on any error. Training checkpoints have their own variant
(`lit_ovis.checkpoint_io`: it also reports a full disk in one line and never puts `ckpt_` in a temp name).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

# URL schemes LitData / fsspec stream from; `local:` is LitData's prefix for a local cache of a remote root.
REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "az://", "abfs://", "hf://", "http://", "https://", "local:")


def is_remote(path: Any) -> bool:
    return isinstance(path, str) and path.startswith(REMOTE_SCHEMES)


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
