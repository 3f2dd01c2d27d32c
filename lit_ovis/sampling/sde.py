"""Stochastic sampler steps with exact Gaussian log-probabilities, for on-policy RL (Flow-GRPO, report Stage 3).

Flow convention (docs/CONTRACT.md): x_t = (1 - t) x0 + t noise, v = noise - x0, t from 1 (noise) to 0 (data);
the deterministic Euler step is x' = x + (t' - t) v. Each step below is a Gaussian policy
p(x' | x_t, c) = N(mean, std^2 I) whose mean depends on the model's velocity v; with noise level 0 it is the
Euler step exactly.

- `sde_step`: Flow-GRPO (Liu et al. 2025, arXiv 2505.05470, Sec. 4.2) converts the ODE into the SDE with the
  same marginals, dx = [v + sigma_t^2 / (2t) (x + (1 - t) v)] dt + sigma_t dW, sigma_t = a sqrt(t / (1 - t)),
  and discretises it with Euler-Maruyama: mean = x + [v + sigma_t^2/(2t) (x + (1-t) v)] (t' - t),
  std = sigma_t sqrt(t - t').
- `cps_step`: coefficients-preserving sampling (Wang & Yu 2025, arXiv 2509.05952, Sec. 4): with
  x0_hat = x - t v and x1_hat = x + (1 - t) v, x' = (1 - t') x0_hat + t' cos(eta pi/2) x1_hat + t' sin(eta pi/2) eps,
  so the noise coefficients of x' sum in quadrature to t' (no excess noise, unlike the SDE step).

Log-probabilities are the full Gaussian density (constants included) reduced over non-batch dims by
`reduce="mean"` (Flow-GRPO's choice: a per-dimension average, so ratios stay O(1) at any resolution) or
`"sum"` (the true log-density of the step). A step with std 0 (CPS at t' = 0, any step at noise level 0) is
deterministic: its log-prob is reported as 0 and `StepOutput.stochastic` is False; such steps carry no policy
gradient and are excluded from training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lit_ovis.errors import ConfigError

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
SAMPLERS = ("ode", "sde", "cps")


@dataclass
class StepOutput:
    sample: torch.Tensor  # x_{t'}
    mean: torch.Tensor  # mean of p(x_{t'} | x_t)
    std: torch.Tensor  # per-sample std, shape [B]
    log_prob: torch.Tensor  # log p(sample | x_t), shape [B]

    @property
    def stochastic(self) -> bool:
        return bool((self.std > 0).all())


def _per_sample(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A scalar or [B] time as fp32 [B]."""
    t = torch.as_tensor(t, dtype=torch.float32, device=like.device)
    return t.expand(like.shape[0]) if t.ndim == 0 else t.reshape(like.shape[0])


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """log N(x; mean, std^2 I) per sample ([B]); std is [B]. Zero where std == 0 (deterministic step)."""
    if reduce not in ("mean", "sum"):
        raise ConfigError(f"log-prob reduce must be 'mean' or 'sum', got {reduce!r}")
    std = std.float()
    safe = torch.where(std > 0, std, torch.ones_like(std))
    s = _bcast(safe, x)
    lp = -((x.float() - mean.float()) ** 2) / (2.0 * s**2) - torch.log(s) - LOG_SQRT_2PI
    dims = tuple(range(1, x.ndim))
    lp = lp.mean(dims) if reduce == "mean" else lp.sum(dims)
    return torch.where(std > 0, lp, torch.zeros_like(lp))


def _finish(mean, std, prev_sample, noise, generator, reduce) -> StepOutput:
    if prev_sample is None:
        if noise is None:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
        prev_sample = mean + _bcast(std, mean) * noise.float()
    prev_sample = prev_sample.float()
    return StepOutput(prev_sample, mean, std, gaussian_log_prob(prev_sample.detach(), mean, std, reduce))


def sde_std(t: torch.Tensor, t_next: torch.Tensor, noise_level: float) -> torch.Tensor:
    """Flow-GRPO diffusion coefficient sigma_t = a sqrt(t / (1 - t)). At t = 1 it is infinite, so there the
    denominator uses 1 - t' instead (as Flow-GRPO does with its second schedule entry)."""
    one_minus = torch.where(t >= 1.0, 1.0 - t_next, 1.0 - t).clamp_min(1e-6)
    return noise_level * torch.sqrt(t / one_minus)


def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    t: torch.Tensor | float,
    t_next: torch.Tensor | float,
    noise_level: float = 0.7,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    reduce: str = "mean",
) -> StepOutput:
    """One Flow-GRPO Euler-Maruyama step from t to t' < t (arXiv 2505.05470, Eq. 9). Give `prev_sample` to
    evaluate the log-prob of a stored transition, else one is drawn (from `noise` or `generator`)."""
    x32, v32 = x.float(), v.float()
    t, t_next = _per_sample(t, x), _per_sample(t_next, x)
    sig = sde_std(t, t_next, noise_level)
    dt = _bcast(t_next - t, x32)  # negative
    coef = _bcast(sig**2 / (2.0 * t.clamp_min(1e-6)), x32)
    drift = v32 + coef * (x32 + _bcast(1.0 - t, x32) * v32)
    mean = x32 + drift * dt
    std = sig * torch.sqrt((t - t_next).clamp_min(0.0))
    return _finish(mean, std, prev_sample, noise, generator, reduce)


def cps_step(
    x: torch.Tensor,
    v: torch.Tensor,
    t: torch.Tensor | float,
    t_next: torch.Tensor | float,
    noise_level: float = 0.7,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    reduce: str = "mean",
) -> StepOutput:
    """One coefficients-preserving step (arXiv 2509.05952): noise_level = eta in [0, 1]; t' = 0 is deterministic."""
    if not 0.0 <= noise_level <= 1.0:
        raise ConfigError(f"CPS noise_level (eta) must lie in [0, 1], got {noise_level}")
    x32, v32 = x.float(), v.float()
    t, t_next = _per_sample(t, x), _per_sample(t_next, x)
    x0_hat = x32 - _bcast(t, x32) * v32
    x1_hat = x32 + _bcast(1.0 - t, x32) * v32
    angle = noise_level * math.pi / 2.0
    mean = _bcast(1.0 - t_next, x32) * x0_hat + _bcast(t_next * math.cos(angle), x32) * x1_hat
    std = t_next * math.sin(angle)
    return _finish(mean, std, prev_sample, noise, generator, reduce)


def ode_step(
    x: torch.Tensor, v: torch.Tensor, t, t_next, noise_level: float = 0.0, prev_sample=None, noise=None,
    generator=None, reduce: str = "mean",
) -> StepOutput:
    """The deterministic Euler step in the same interface (std 0, log-prob 0)."""
    x32 = x.float()
    t, t_next = _per_sample(t, x), _per_sample(t_next, x)
    mean = x32 + _bcast(t_next - t, x32) * v.float()
    std = torch.zeros_like(t)
    return StepOutput(mean if prev_sample is None else prev_sample.float(), mean, std, torch.zeros_like(t))


def sampler_step(kind: str, *args, **kwargs) -> StepOutput:
    """Dispatch by name: "ode", "sde" (Flow-GRPO) or "cps" (coefficients-preserving)."""
    fns = {"ode": ode_step, "sde": sde_step, "cps": cps_step}
    if kind not in fns:
        raise ConfigError(f"unknown sampler {kind!r}: use one of {SAMPLERS} (grpo.sampler)")
    return fns[kind](*args, **kwargs)


def step_noise(out: StepOutput) -> torch.Tensor:
    """The standard normal draw that produced `out.sample` ((x' - mean) / std; zero for deterministic steps)."""
    std = out.std.float()
    safe = _bcast(torch.where(std > 0, std, torch.ones_like(std)), out.sample)
    eps = (out.sample - out.mean) / safe
    return torch.where(_bcast(std > 0, eps), eps, torch.zeros_like(eps))


@dataclass
class Trajectory:
    """One batch of stochastic rollouts: everything the GRPO update needs, detached."""

    latents: torch.Tensor  # [B, K + 1, ...]: x at sigmas[0..K] (the last is the clean sample)
    log_probs: torch.Tensor  # [B, K]: log p_old(x_{k+1} | x_k)
    noise: torch.Tensor  # [B, K, ...]: the standard normal draw of each step (0 on deterministic steps)
    std: torch.Tensor  # [K]: per-step std (0 = deterministic step)
    sigmas: torch.Tensor  # [K + 1]


@torch.no_grad()
def sde_sample(
    transformer,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    text_ids: torch.Tensor,
    img_ids: torch.Tensor,
    sigmas: torch.Tensor,
    kind: str = "cps",
    noise_level: float = 0.7,
    negative_embeds: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    reduce: str = "mean",
) -> Trajectory:
    """Roll packed latents from sigmas[0] to 0 with the chosen stochastic step and CFG, recording the
    trajectory and the old policy's log-probs (Flow-GRPO's rollout phase)."""
    from lit_ovis.sampling.ode import velocity  # the pipeline-exact guided velocity

    sigmas = sigmas.to(latents.device)
    xs, lps, eps, stds = [latents.float()], [], [], []
    x = latents
    for i in range(len(sigmas) - 1):
        v = velocity(transformer, x, sigmas[i], prompt_embeds, text_ids, img_ids, negative_embeds,
                     guidance_scale=guidance_scale)
        out = sampler_step(kind, x, v, sigmas[i], sigmas[i + 1], noise_level=noise_level, generator=generator,
                           reduce=reduce)
        xs.append(out.sample)
        lps.append(out.log_prob)
        eps.append(step_noise(out))
        stds.append(out.std[0])
        x = out.sample.to(latents.dtype)
    return Trajectory(torch.stack(xs, 1), torch.stack(lps, 1), torch.stack(eps, 1), torch.stack(stds), sigmas)
