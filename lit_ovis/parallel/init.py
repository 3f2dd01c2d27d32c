"""Sharded initialisation from pretrained weights: the backbone is built on the meta device, sharded by
FSDP2, given local storage, and filled from ONE rank's copy of the weights (broadcast shard by shard).

Without it every rank would build the full fp32 model on the host and read the weights again: at 7B
that is ~30 GB of random init plus the weights per rank, times 8 ranks per node, before sharding
(torchtitan's meta-device initialisation; Lightning's ModelParallelStrategy materialises meta modules
itself only with random `reset_parameters`, which would discard the pretrained weights).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from lit_ovis.errors import CheckpointError


def is_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def read_on_rank0(read: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor] | None:
    """`read()` on rank 0 only (None elsewhere). Its one-line CheckpointError (missing file, keys that do not
    match) is broadcast, so every rank raises it instead of waiting for weights that never come."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    state, message = None, [None]
    if rank == 0:
        try:
            state = read()
        except CheckpointError as err:
            message[0] = str(err)
    if dist.is_initialized():
        dist.broadcast_object_list(message, src=0)
    if message[0]:
        raise CheckpointError(message[0])
    return state


def materialize_from_rank0(module: nn.Module, full_state: dict[str, torch.Tensor] | None, device: torch.device) -> None:
    """Allocate `module`'s (sharded) meta parameters on `device` and load `full_state` (from `read_on_rank0`:
    checked there, held by rank 0 only). Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    rank = dist.get_rank() if dist.is_initialized() else 0
    module.to_empty(device=device)
    # Rank 0's tensors stay on the host; torch moves and broadcasts them one at a time, and each rank casts
    # its shard to the parameter dtype (fp32 master weights from bf16 files).
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=dist.is_initialized(), strict=True)
    # a fresh dict per call: set_model_state_dict replaces its entries with the loaded shards
    set_model_state_dict(module, dict(full_state) if rank == 0 else {}, options=options)
