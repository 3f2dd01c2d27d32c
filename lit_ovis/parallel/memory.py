"""Memory levers that wrap the backbone's blocks without changing its parameters or state-dict keys.

Activation checkpointing re-runs a block's forward in backward instead of storing its activations
("full": every block; "selective": every Nth block, trading memory for less recompute).

Activation offloading moves what autograd saves for backward to (pinned) host memory during the forward
and brings it back in backward. Only activations move: parameters and what autograd derives from them by
views and casts (FSDP2's gathered bf16 weights, autocast's bf16 copies, `W.t()` that linear saves) stay on
the device, where they already are, as do tensors below `min_bytes` (modulation vectors, RoPE tables:
copying them costs more launches than it saves). A tensor saved by several ops is copied once. Copies are
`non_blocking` on the compute stream into pinned memory, so they need no host synchronisation and stream
order keeps them correct.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.weak import WeakTensorKeyDictionary

# Single-input autograd nodes a weight passes through before an op saves it (views, transposes, casts).
_WEIGHT_CHAIN_DEPTH = 4


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


def derives_from_parameter(t: torch.Tensor) -> bool:
    """True for a leaf that requires grad (a parameter, FSDP2's unsharded parameter) or a tensor reached
    from one through a short chain of single-input nodes (`W.t()`, autocast's `W.to(bf16)`)."""
    fn = t.grad_fn
    if fn is None:
        return t.requires_grad
    for _ in range(_WEIGHT_CHAIN_DEPTH):
        nxt = [f for f, _ in fn.next_functions if f is not None]
        if len(nxt) != 1:
            return False
        fn = nxt[0]
        if type(fn).__name__ == "AccumulateGrad":
            return True
    return False


class ActivationOffloader:
    """A `saved_tensors_hooks` pack/unpack pair that moves activations to host memory.

    `device_types`: devices whose tensors are moved (only accelerators by default; "cpu" makes the hooks
    copy CPU tensors too, which measures what would move). `moved_bytes`/`moved_tensors` count what all
    forwards so far moved (host-side counters: no synchronisation).
    """

    def __init__(self, min_bytes: int = 1 << 20, pin_memory: bool | None = None, device_types: tuple[str, ...] = ("cuda",)):
        self.min_bytes = min_bytes
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.device_types = tuple(device_types)
        self.param_storages: set[int] = set()
        self._copies = WeakTensorKeyDictionary()  # weak: a freed activation's memory can be reused safely
        self.moved_bytes = 0
        self.moved_tensors = 0

    def track_parameters(self, module: nn.Module) -> None:
        """Remember the storages of `module`'s current parameters (frozen ones included): never moved."""
        local = (p.to_local() if hasattr(p, "to_local") else p for p in module.parameters())  # DTensor shards
        self.param_storages = {p.untyped_storage().data_ptr() for p in local}

    def offloadable(self, t: torch.Tensor) -> bool:
        if type(t) is not torch.Tensor:  # parameters, DTensors and other subclasses stay where they are
            return False
        if t.device.type not in self.device_types or t.numel() * t.element_size() < self.min_bytes:
            return False
        if derives_from_parameter(t):
            return False
        return t.untyped_storage().data_ptr() not in self.param_storages

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=self.pin_memory and t.is_cuda)
        host.copy_(t, non_blocking=self.pin_memory)
        self.moved_bytes += t.numel() * t.element_size()
        self.moved_tensors += 1
        return host

    def pack(self, t: torch.Tensor):
        if not self.offloadable(t):
            return t
        # One tensor saved by several ops (a block's normed input feeds q, k, v and the MLP) is copied once.
        version, host = self._copies.get(t, (None, None))
        if host is None or version != t._version:
            host = self.to_host(t)
            self._copies[t] = (t._version, host)
        return (t.device, host)

    @contextmanager
    def hooks(self):
        """The pack/unpack hooks for one forward; per-forward de-duplication is dropped when it ends."""
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                yield
        finally:
            self._copies = WeakTensorKeyDictionary()

    def unpack(self, packed):
        if isinstance(packed, tuple):
            device, host = packed
            return host.to(device, non_blocking=self.pin_memory)
        return packed


def apply_activation_offloading(backbone: nn.Module, pin_memory: bool | None = None, min_bytes: int = 1 << 20,
                                device_types: tuple[str, ...] = ("cuda",)) -> ActivationOffloader:
    """Run the backbone's forward under an `ActivationOffloader` (see the module docstring)."""
    existing = getattr(backbone, "_lit_ovis_offloader", None)
    if existing is not None:
        return existing
    offloader = ActivationOffloader(min_bytes=min_bytes, pin_memory=pin_memory, device_types=device_types)
    forward = backbone.forward

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        offloader.track_parameters(backbone)
        with offloader.hooks():
            return forward(*args, **kwargs)

    backbone.forward = run
    backbone._lit_ovis_offloader = offloader
    return offloader
