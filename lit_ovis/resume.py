"""Finding the checkpoint a rerun resumes from: the newest *complete* one, never a half-written file."""

from __future__ import annotations

import os
from pathlib import Path


def is_complete(path: Path) -> bool:
    """A `.ckpt` file (atomically renamed into place) or a sharded directory with DCP metadata.
    `.X.old` (a complete sharded checkpoint moved aside during a swap) counts; temp files never do."""
    if ".tmp" in path.name or (path.name.startswith(".") and not path.name.endswith(".old")):
        return False
    if path.is_file():
        return path.suffix == ".ckpt" and path.stat().st_size > 0
    return path.is_dir() and (path / ".metadata").exists()


def checkpoint_dirs(trainer) -> list[Path]:
    dirs = []
    for cb in getattr(trainer, "checkpoint_callbacks", []) or []:
        if getattr(cb, "dirpath", None):
            dirs.append(Path(cb.dirpath))
    root = Path(getattr(trainer, "default_root_dir", ".") or ".")
    dirs.append(root / "checkpoints")
    return dirs


def resolve_ckpt_path(trainer_or_dir) -> str | None:
    """`last` checkpoint if complete, else the newest complete checkpoint, else None (fresh start)."""
    dirs = [Path(trainer_or_dir)] if isinstance(trainer_or_dir, (str, os.PathLike)) else checkpoint_dirs(trainer_or_dir)
    candidates: list[Path] = []
    for d in dirs:
        if not d.is_dir():
            continue
        last = [p for p in (d / "last.ckpt", d / "last", d / ".last.ckpt.old") if p.exists() and is_complete(p)]
        if last:
            return str(last[0])
        candidates += [p for p in d.iterdir() if is_complete(p)]
    if not candidates:
        return None
    return str(max(candidates, key=lambda p: p.stat().st_mtime))
