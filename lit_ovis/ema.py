"""Exponential moving average of trainable weights, kept as buffers so checkpoints (single-file or sharded
DCP) save and restore it with the model.

Shadows are keyed by canonical parameter names (wrapper prefixes such as `_checkpoint_wrapped_module.`,
`_fsdp_wrapped_module.` or `_orig_mod.` stripped), so wrapping the model after the EMA was made does not
break the lookup. Under FSDP2 the shadows are made after sharding: they are DTensors sharded exactly like
the parameters, and updates run on the local shards only (no full copy per rank, no communication).
Classic FSDP1 flattens and shards parameters into FlatParameters that no per-parameter shadow can track
across a checkpoint, so the EMA refuses it with a one-line error.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from lit_ovis.errors import ConfigError

WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.", "_offload_wrapped_module.")
FSDP1_ERROR = ("model.ema.enabled=true does not work with the classic FSDPStrategy (FSDP1 flat-shards parameters): "
               "use configs/strategy/fsdp2.yaml or hsdp.yaml, or set --model.ema.enabled false")


def canonical_name(name: str) -> str:
    """A parameter name without the prefixes that FSDP1, checkpoint wrappers and torch.compile insert."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def canonical_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """`named_parameters` under canonical names; refuses FSDP1-wrapped models (see module docstring)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ConfigError(FSDP1_ERROR)
    return {canonical_name(n): p for n, p in model.named_parameters()}


def _local(t: torch.Tensor) -> torch.Tensor:
    """The rank-local shard of a DTensor (the tensor itself otherwise)."""
    return t.to_local() if hasattr(t, "to_local") else t


def _key(name: str) -> str:
    return name.replace(".", "__")


class EMA(nn.Module):
    def __init__(self, model: nn.Module, decay: float = 0.9999):
        super().__init__()
        self.decay = decay
        params = canonical_parameters(model)
        self._names = [n for n, p in params.items() if p.requires_grad]
        for name in self._names:
            self.register_buffer(_key(name), params[name].detach().clone().float(), persistent=True)

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(local shadow shards, local parameter shards) in the same order."""
        params = canonical_parameters(model)
        missing = [n for n in self._names if n not in params]
        if missing:
            raise ConfigError(f"EMA: the model has no parameter '{missing[0]}' (and {len(missing) - 1} more); "
                              "build the EMA from the same backbone it updates")
        shadows = [_local(getattr(self, _key(n))) for n in self._names]
        current = [_local(params[n].detach()) for n in self._names]
        for n, s, c in zip(self._names, shadows, current):
            if s.shape != c.shape:
                raise ConfigError(f"EMA: shadow of '{n}' has shape {tuple(s.shape)} but the parameter's local shard has "
                                  f"{tuple(c.shape)}; create the EMA after parallelize_module (sharding)")
        return shadows, current

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None, gate: torch.Tensor | None = None) -> None:
        """shadow += (1 - decay) (param - shadow); with `gate` (a 0-dim device tensor, 0 or 1) the step is
        scaled by it on the device, so a skipped optimizer step leaves the EMA exactly as it was."""
        d = self.decay if decay is None else decay
        shadows, current = self._pairs(model)
        current = [c.float() for c in current]
        if gate is None:
            torch._foreach_lerp_(shadows, current, 1.0 - d)
        else:
            weight = gate.to(shadows[0].device, torch.float32) * (1.0 - d) if shadows else gate
            torch._foreach_lerp_(shadows, current, [weight] * len(shadows))

    def shadow_state_dict(self) -> dict[str, torch.Tensor]:
        """EMA weights under the model's canonical parameter names."""
        return {n: getattr(self, _key(n)) for n in self._names}

    @contextmanager
    def swapped_into(self, model: nn.Module):
        """Temporarily run `model` with EMA weights (for sample grids and evaluation); shard-local copies."""
        shadows, current = self._pairs(model)
        backup = [c.clone() for c in current]
        with torch.no_grad():
            for s, c in zip(shadows, current):
                c.copy_(s)
        try:
            yield model
        finally:
            with torch.no_grad():
                for b, c in zip(backup, current):
                    c.copy_(b)
