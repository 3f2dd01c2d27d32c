"""Lightning's ModelParallelStrategy (FSDP2 in `configure_model`) with atomic sharded checkpoints: every
rank writes into `.<name>.tmp`, then rank 0 swaps the finished directory into place with renames, so a
kill or a full disk during a save never corrupts the last good checkpoint."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy


class AtomicModelParallelStrategy(ModelParallelStrategy):
    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        path = Path(filepath)
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        tmp = path.with_name(f".{path.name}.tmp")
        old = path.with_name(f".{path.name}.old")
        if self.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)
        self.barrier("lit_ovis_ckpt_pre")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("lit_ovis_ckpt_written")
        if self.is_global_zero:
            if path.exists():
                os.replace(path, old)  # a kill between these two renames leaves the complete `.old`
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        self.barrier("lit_ovis_ckpt_post")


def _ovis_blocks():
    from diffusers.models.transformers.transformer_ovis_image import OvisImageSingleTransformerBlock, OvisImageTransformerBlock

    return {OvisImageTransformerBlock, OvisImageSingleTransformerBlock}


class OvisFSDPStrategy(FSDPStrategy):
    """Lightning's classic FSDPStrategy (FSDP1) wrapped at MMDiT block granularity, for users who expect it
    (GPU only: FSDPStrategy refuses CPU)."""

    def __init__(self, sharding_strategy: str = "HYBRID_SHARD", activation_checkpointing: bool = True, state_dict_type: str = "sharded",
                 limit_all_gathers: bool = True, cpu_offload: bool = False):
        blocks = _ovis_blocks()
        super().__init__(
            sharding_strategy=sharding_strategy, auto_wrap_policy=blocks,
            activation_checkpointing_policy=blocks if activation_checkpointing else None,
            state_dict_type=state_dict_type, limit_all_gathers=limit_all_gathers, cpu_offload=cpu_offload,
        )
