"""The few collectives the stages call themselves (Lightning does the rest): gathering tensors whose first
dimension differs by rank, and averaging a small tensor over ranks. Without an initialised process group
(one process) both are identities, so the same code runs on a laptop and under FSDP2."""

from __future__ import annotations

import torch
import torch.distributed as dist

from lit_ovis.losses.grpo import GroupStatTracker, group_advantages


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_varlen(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate a [N, ...] tensor from every rank (N may differ); returns it and this rank's offset."""
    if not distributed():
        return x, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.int64)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = torch.zeros((max(sizes),) + x.shape[1:], dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]), sum(sizes[:rank])


def mean_over_ranks(x: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """The mean of `x` over ranks (reduced on `device`, e.g. the GPU for NCCL), returned where `x` was."""
    if not distributed():
        return x
    y = x.to(device) if device is not None else x.clone()
    dist.all_reduce(y)
    return (y / dist.get_world_size()).to(x.device)


def global_group_advantages(
    rewards: torch.Tensor, keys: torch.Tensor, eps: float = 1e-4, global_std: bool = False,
    tracker: GroupStatTracker | None = None,
) -> torch.Tensor:
    """This rank's advantages, with group statistics over all ranks' members of each group."""
    all_r, offset = all_gather_varlen(rewards.float())
    all_k, _ = all_gather_varlen(keys)
    if tracker is not None:  # every rank updates an identical tracker with identical data
        adv = tracker.update([str(int(k)) for k in all_k.tolist()], all_r)
    else:
        adv = group_advantages(all_r, all_k, eps=eps, global_std=global_std)
    return adv[offset: offset + rewards.shape[0]]
