"""AdamW with fused kernels (CUDA and CPU), falling back to foreach where the fused kernel cannot run.

The fused kernel is also what lets `callbacks.nan_guard.NanGuard` skip a non-finite step on the device: it
takes a `found_inf` flag and then leaves weights, moments and the step count alone, with no host read. The
foreach kernel reads every parameter's step count on the host each step (on CPU, 5x slower at the tiny size).
"""

from __future__ import annotations

import torch

FUSED_DEVICES = ("cuda", "cpu")


def fused_capable(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW runs on these parameters (floating point, on CUDA or CPU)."""
    return bool(params) and all(p.is_floating_point() and p.device.type in FUSED_DEVICES for p in params)


def make_adamw(params, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0, eps: float = 1e-8) -> torch.optim.AdamW:
    params = list(params)
    impl = {"fused": True} if fused_capable(params) else {"foreach": True}
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps, **impl)


def skips_on_device(optimizer) -> bool:
    """Whether `optimizer.step()` honours a `found_inf` tensor attribute (torch's fused Adam/AdamW/SGD/Adagrad
    kernels): the whole step is then a no-op on the device when found_inf is 1."""
    kinds = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)
    return isinstance(optimizer, kinds) and all(group.get("fused") for group in optimizer.param_groups)
