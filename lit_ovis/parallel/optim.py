"""AdamW that takes the fastest implementation available: fused CUDA kernels on GPU, foreach on CPU."""

from __future__ import annotations

import torch


def make_adamw(params, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0, eps: float = 1e-8) -> torch.optim.AdamW:
    params = list(params)
    on_cuda = bool(params) and all(getattr(p, "is_cuda", False) for p in params)
    impl = {"fused": True} if on_cuda else {"foreach": True}
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps, **impl)
