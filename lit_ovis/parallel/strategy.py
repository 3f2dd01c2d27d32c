"""Lightning's ModelParallelStrategy (FSDP2 in `configure_model`) with atomic sharded checkpoints, and
Lightning's classic FSDPStrategy (FSDP1) wrapped at MMDiT block granularity.

Sharded save: every rank writes into `.<name>.tmp`; once all ranks succeeded, rank 0 swaps the finished
directory into place (`<name>` -> `.<name>.old`, `.tmp` -> `<name>`, then deletes `.old`). A kill at any
point leaves either the old or the new complete checkpoint; a failure on any rank (full disk, I/O error)
is shared with all ranks, so none waits at a barrier for a rank that gave up, and every rank raises the
same one-line CheckpointError while the previous checkpoint stays in place.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

from lit_ovis.checkpoints import is_sharded_checkpoint
from lit_ovis.errors import CheckpointError, ConfigError


def prepare_sharded_target(path: Path) -> None:
    """Clear the leftovers of an interrupted save before writing `path` again.

    A kill between the two renames leaves no `path` but a complete `.old`: that is the last good
    checkpoint, so it is moved back. Any other `.old` (a kill during its deletion) and any `.tmp` are stale.
    """
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    if old.exists():
        if not path.exists() and is_sharded_checkpoint(old):
            os.replace(old, path)
        else:
            shutil.rmtree(old)


def publish_sharded(path: Path) -> None:
    """Swap the finished `.tmp` directory into place, keeping the previous checkpoint until it is."""
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    if path.exists():
        os.replace(path, old)  # a kill between these two renames leaves the complete `.old`
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


class AtomicModelParallelStrategy(ModelParallelStrategy):
    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint(..., storage_options=...) is not supported (it does not use CheckpointIO)")
        path = Path(self.broadcast(str(filepath)))
        tmp = path.with_name(f".{path.name}.tmp")
        self._on_rank_zero(prepare_sharded_target, path, stage="prepare")
        try:
            self._write(checkpoint, tmp, path)
        except CheckpointError:
            if self.is_global_zero:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._on_rank_zero(publish_sharded, path, stage="publish")

    def _write(self, checkpoint: dict, tmp: Path, path: Path) -> None:
        """Lightning's sharded layout (DCP shards + rank 0's `meta.pt`), with an agreement after each part."""
        from lightning.fabric.strategies.fsdp import _distributed_checkpoint_save
        from lightning.fabric.utilities.load import _METADATA_FILENAME
        from torch.distributed.checkpoint.api import CheckpointException

        self._on_rank_zero(lambda _: tmp.mkdir(parents=True, exist_ok=True), path, stage="write")
        state = {"state_dict": checkpoint.pop("state_dict")}
        state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        error = None
        try:
            _distributed_checkpoint_save(state, tmp)  # DCP gathers write errors from all ranks and raises on each
        except (Exception, CheckpointException) as err:  # noqa: BLE001 - CheckpointException is a BaseException
            error = err
        self._agree(path, error, stage="write")
        self._on_rank_zero(lambda _: torch.save(checkpoint, tmp / _METADATA_FILENAME), path, stage="write")

    def _on_rank_zero(self, fn, path: Path, stage: str) -> None:
        error = None
        if self.is_global_zero:
            try:
                fn(path)
            except Exception as err:  # noqa: BLE001 - OSError, or RuntimeError from torch.save on a full disk
                error = err
        self._agree(path, error, stage)

    def _agree(self, path: Path, error: BaseException | None, stage: str) -> None:
        """All ranks learn whether any rank failed (one collective); all raise the same error if so."""
        message = None if error is None else describe_failure(error, self.global_rank)
        messages = [message]
        if torch.distributed.is_available() and torch.distributed.is_initialized() and self.world_size > 1:
            messages = [None] * self.world_size
            torch.distributed.all_gather_object(messages, message)
        failed = list(dict.fromkeys(m for m in messages if m is not None))
        if failed:
            raise CheckpointError(f"{path}: sharded checkpoint {stage} failed ({'; '.join(failed)}); the previous checkpoint "
                                  "is kept; free disk space or fix the directory, then save again")


def describe_failure(err: BaseException, rank: int) -> str:
    """One line: the failing rank(s) and the first line of the underlying error. DCP's CheckpointException
    (raised on every rank) carries each failing rank's exception in `failures`."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        first = failures[min(failures)]
        cause = first[0] if isinstance(first, tuple) else first
        ranks = ",".join(str(r) for r in sorted(failures))
    else:
        cause, ranks = err, str(rank)
    text = str(cause).splitlines()[0] if str(cause) else ""
    return f"rank {ranks}: {type(cause).__name__}: {text}"


def _ovis_blocks():
    from diffusers.models.transformers.transformer_ovis_image import OvisImageSingleTransformerBlock, OvisImageTransformerBlock

    return {OvisImageTransformerBlock, OvisImageSingleTransformerBlock}


class OvisFSDPStrategy(FSDPStrategy):
    """Lightning's classic FSDPStrategy (FSDP1) wrapped at MMDiT block granularity, for users who expect it
    (GPU only: FSDPStrategy refuses CPU). It checkpoints blocks and sets precision itself, so
    `parallelize_module` skips those levers; the EMA cannot track FSDP1's flat shards and is refused."""

    def __init__(self, sharding_strategy: str = "HYBRID_SHARD", activation_checkpointing: bool = True, state_dict_type: str = "sharded",
                 limit_all_gathers: bool = True, cpu_offload: bool = False):
        blocks = _ovis_blocks()
        super().__init__(
            sharding_strategy=sharding_strategy, auto_wrap_policy=blocks,
            activation_checkpointing_policy=blocks if activation_checkpointing else None,
            state_dict_type=state_dict_type, limit_all_gathers=limit_all_gathers, cpu_offload=cpu_offload,
        )

    def setup(self, trainer) -> None:
        from lit_ovis.ema import FSDP1_ERROR

        if getattr(self.lightning_module, "ema", None) is not None:
            raise ConfigError(FSDP1_ERROR)
        super().setup(trainer)
