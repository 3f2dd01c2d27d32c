"""Exponential moving average of trainable weights, kept as buffers so checkpoints (single-file or sharded
DCP) save and restore it with the model. Shadows are created after sharding, so under FSDP2 they are
DTensors sharded exactly like the parameters (no full copy per rank)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def _key(name: str) -> str:
    return name.replace(".", "__")


class EMA(nn.Module):
    def __init__(self, model: nn.Module, decay: float = 0.9999):
        super().__init__()
        self.decay = decay
        self._names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        for name in self._names:
            self.register_buffer(_key(name), params[name].detach().clone().float(), persistent=True)

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        d = self.decay if decay is None else decay
        params = dict(model.named_parameters())
        shadows = [getattr(self, _key(n)) for n in self._names]
        current = [params[n].detach().float() for n in self._names]
        torch._foreach_lerp_(shadows, current, 1.0 - d)

    def shadow_state_dict(self) -> dict[str, torch.Tensor]:
        """EMA weights under the model's own parameter names."""
        return {n: getattr(self, _key(n)) for n in self._names}

    @contextmanager
    def swapped_into(self, model: nn.Module):
        """Temporarily run `model` with EMA weights (for sample grids and evaluation)."""
        params = dict(model.named_parameters())
        backup = {n: params[n].detach().clone() for n in self._names}
        with torch.no_grad():
            for n in self._names:
                params[n].copy_(getattr(self, _key(n)).to(params[n].dtype))
        try:
            yield model
        finally:
            with torch.no_grad():
                for n in self._names:
                    params[n].copy_(backup[n])
