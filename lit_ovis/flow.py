"""Rectified-flow (flow-matching) math as pure functions.

Convention (shared by training, samplers and the diffusers pipeline): t = sigma in [0, 1],
x_t = (1 - t) * x0 + t * noise, and the network predicts the velocity v = noise - x0, so an Euler
step from t to t' is x_t' = x_t + (t' - t) * v.
"""

from __future__ import annotations

import math

import torch

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")
TIMESTEP_SHIFTS = ("none", "static", "dynamic")
LOSS_WEIGHTINGS = ("none", "cosmap", "sigma_sqrt")


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape + (1,) * (like.ndim - t.ndim)).to(like.dtype)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise, with t of shape [B]."""
    t = _expand(t, x0)
    return (1.0 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def predicted_x0(x_t: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Clean-sample estimate implied by a velocity prediction: x0 = x_t - t v."""
    return x_t - _expand(t, x_t) * velocity


def resolution_shift_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX/SD3 resolution-dependent shift: mu grows linearly with the number of image tokens."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def shift_exponential(t: torch.Tensor, mu: float) -> torch.Tensor:
    """Dynamic (resolution) shift t -> e^mu / (e^mu + 1/t - 1); pushes t towards noise for larger images."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))


def shift_static(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 static shift t -> s t / (1 + (s - 1) t)."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def sample_timesteps(
    batch_size: int,
    method: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Training timesteps in (0, 1): `uniform` or `logit_normal` (sigmoid of a normal, SD3)."""
    if method == "uniform":
        t = torch.rand(batch_size, generator=generator, device=device)
    elif method == "logit_normal":
        t = torch.sigmoid(logit_mean + logit_std * torch.randn(batch_size, generator=generator, device=device))
    else:
        raise ValueError(f"unknown timestep sampling '{method}': use one of {TIMESTEP_SAMPLINGS}")
    # Keep strictly inside (0, 1): t = 0 gives no learning signal and t = 1 breaks the shifts.
    return t.clamp(1e-5, 1.0 - 1e-5)


def shift_timesteps(
    t: torch.Tensor,
    mode: str = "none",
    shift: float = 3.0,
    image_seq_len: int | None = None,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> torch.Tensor:
    """Apply `none`, `static` (SD3, by `shift`) or `dynamic` (FLUX, by image token count) shifting."""
    if mode == "none":
        return t
    if mode == "static":
        return shift_static(t, shift)
    if mode == "dynamic":
        if image_seq_len is None:
            raise ValueError("dynamic timestep shift needs image_seq_len")
        mu = resolution_shift_mu(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift)
        return shift_exponential(t, mu)
    raise ValueError(f"unknown timestep shift '{mode}': use one of {TIMESTEP_SHIFTS}")


def loss_weights(t: torch.Tensor, scheme: str = "none") -> torch.Tensor:
    """Per-sample loss weights: `none`, `cosmap` (SD3) or `sigma_sqrt` (1 / t^2, clamped)."""
    if scheme == "none":
        return torch.ones_like(t)
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * t + 2.0 * t**2))
    if scheme == "sigma_sqrt":
        return (t**-2.0).clamp(max=1e4)
    raise ValueError(f"unknown loss weighting '{scheme}': use one of {LOSS_WEIGHTINGS}")


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all non-batch dims, computed in fp32 -> [B]."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def flow_matching_loss(
    pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted flow-matching loss. Returns (scalar loss, per-sample unweighted loss [B])."""
    per_sample = per_sample_mse(pred, target)
    if weights is None:
        return per_sample.mean(), per_sample
    return (weights.float() * per_sample).mean(), per_sample


def caption_dropout_mask(batch_size: int, p: float, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Bool [B]: True where the caption is replaced by the empty prompt (trains the CFG unconditional branch)."""
    if p <= 0:
        return torch.zeros(batch_size, dtype=torch.bool, device=device)
    return torch.rand(batch_size, generator=generator, device=device) < p


def apply_caption_dropout(embeds: torch.Tensor, empty_embed: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Swap the embeddings of dropped samples for the embedding of the empty prompt ([1, L, D] or [L, D])."""
    empty = empty_embed.reshape(1, *embeds.shape[1:]).to(embeds)
    return torch.where(drop.reshape(-1, 1, 1), empty, embeds)


def timestep_buckets(t: torch.Tensor, num_buckets: int = 4) -> torch.Tensor:
    """Bucket index of each timestep for per-range loss logging (bucket k covers [k/n, (k+1)/n))."""
    return (t * num_buckets).long().clamp(0, num_buckets - 1)
