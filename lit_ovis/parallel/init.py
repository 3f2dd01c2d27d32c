"""Sharded initialisation from pretrained weights: the backbone is built on the meta device, sharded by
FSDP2, given local storage, and filled from ONE rank's copy of the weights (broadcast shard by shard).

Without it every rank would build the full fp32 model on the host and read the weights again: at 7B
that is ~30 GB of random init plus the weights per rank, times 8 ranks per node, before sharding
(torchtitan's meta-device initialisation; Lightning's ModelParallelStrategy materialises meta modules
itself only with random `reset_parameters`, which would discard the pretrained weights).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from lit_ovis.errors import CheckpointError


def is_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def materialize_from_rank0(module: nn.Module, full_state: dict[str, torch.Tensor] | None, device: torch.device) -> None:
    """Allocate `module`'s (sharded) meta parameters on `device` and load `full_state`, which only rank 0
    holds (None elsewhere). Every rank must call it; an error on rank 0 reaches all ranks (no hang)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    rank = dist.get_rank() if dist.is_initialized() else 0
    expected = {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}
    message = [None]
    if rank == 0:
        missing = sorted(set(expected) - set(full_state or {}))
        unexpected = sorted(set(full_state or {}) - set(expected))
        wrong = [k for k in expected if k in (full_state or {}) and tuple(full_state[k].shape) != expected[k][0]]
        if missing or unexpected or wrong:
            message[0] = (f"pretrained weights do not match the sharded backbone: {len(missing)} missing (e.g. {missing[:3]}), "
                          f"{len(unexpected)} unexpected, {len(wrong)} wrong-shape keys; pick the matching preset or weights")
    if dist.is_initialized():
        dist.broadcast_object_list(message, src=0)
    if message[0]:
        raise CheckpointError(message[0])
    module.to_empty(device=device)
    # Rank 0's tensors stay on the host; torch moves and broadcasts them one at a time, and each rank casts
    # its shard to the parameter dtype (fp32 master weights from bf16 files).
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=dist.is_initialized(), strict=True)
    # a fresh dict per call: set_model_state_dict replaces its entries with the loaded shards
    set_model_state_dict(module, dict(full_state) if rank == 0 else {}, options=options)
