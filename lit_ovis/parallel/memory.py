"""Memory levers that wrap the backbone's blocks without changing its parameters or state-dict keys.

Activation checkpointing re-runs a block's forward in backward instead of storing its activations
("full": every block; "selective": every Nth block, trading memory for less recompute). Activation
offloading keeps saved activations in pinned CPU memory during the forward.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def checkpointed_block_indices(num_blocks: int, mode: str, every_n: int) -> list[int]:
    if mode == "full":
        return list(range(num_blocks))
    if mode == "selective":
        every_n = max(1, every_n)
        return [i for i in range(num_blocks) if i % every_n == 0]
    if mode == "none":
        return []
    raise ValueError(f"unknown activation_checkpointing '{mode}': use 'none', 'full' or 'selective'")


def apply_activation_checkpointing(backbone: nn.Module, mode: str = "full", every_n: int = 2) -> list[int]:
    """Checkpoint the chosen blocks by wrapping their `forward` (keys and FSDP hooks stay untouched)."""
    blocks = list(backbone.transformer_blocks) + list(backbone.single_transformer_blocks)
    chosen = checkpointed_block_indices(len(blocks), mode, every_n)
    for i in chosen:
        block = blocks[i]
        if not getattr(block, "_lit_ovis_checkpointed", False):
            block.forward = _checkpointed(block.forward)
            block._lit_ovis_checkpointed = True
    return chosen


def apply_activation_offloading(backbone: nn.Module, pin_memory: bool | None = None) -> None:
    """Run the backbone's forward under `save_on_cpu`, so activations saved for backward live on the host."""
    if getattr(backbone, "_lit_ovis_offloaded", False):
        return
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    forward = backbone.forward

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        with torch.autograd.graph.save_on_cpu(pin_memory=pin):
            return forward(*args, **kwargs)

    backbone.forward = run
    backbone._lit_ovis_offloaded = True
