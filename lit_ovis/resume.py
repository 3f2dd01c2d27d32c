"""Finding the checkpoint a rerun resumes from: the newest *complete* one, never a half-written file.

Candidates: `last.ckpt` and the other checkpoints of every ModelCheckpoint directory, `<root>/checkpoints`,
and the `hpc_ckpt_N.ckpt` files Lightning writes in `default_root_dir` when SLURM signals a job before its
time limit or a preemption. The newest complete candidate wins.
"""

from __future__ import annotations

import os
from pathlib import Path

from lit_ovis.checkpoints import is_complete


def checkpoint_dirs(trainer) -> list[Path]:
    dirs = []
    for cb in getattr(trainer, "checkpoint_callbacks", []) or []:
        if getattr(cb, "dirpath", None):
            dirs.append(Path(cb.dirpath))
    root = Path(getattr(trainer, "default_root_dir", ".") or ".")
    dirs.append(root / "checkpoints")
    return dirs


def candidates(dirs: list[Path], root: Path | None) -> list[Path]:
    found: list[Path] = []
    for d in dirs:
        if d.is_dir():
            found += [p for p in d.iterdir() if is_complete(p)]
    if root is not None and root.is_dir():
        found += [p for p in root.glob("hpc_ckpt_*.ckpt") if is_complete(p)]
    return found


def resolve_ckpt_path(trainer_or_dir) -> str | None:
    """The newest complete checkpoint, or None (fresh start)."""
    if isinstance(trainer_or_dir, (str, os.PathLike)):
        dirs, root = [Path(trainer_or_dir)], None
    else:
        dirs, root = checkpoint_dirs(trainer_or_dir), Path(getattr(trainer_or_dir, "default_root_dir", ".") or ".")
    found = candidates(dirs, root)
    if not found:
        return None
    # `last` wins ties (it is written right after the step checkpoint of the same step).
    return str(max(found, key=lambda p: (p.stat().st_mtime, p.name.startswith("last"))))
