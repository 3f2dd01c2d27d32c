"""Flow-GRPO objective pieces as pure functions (report Stage 3, Eqs. 4-6; Liu et al. 2025, arXiv 2505.05470).

- `group_advantages`: A_i = (R_i - mean_g) / (std_g + eps) over each prompt's group (Eq. 4); population std
  (ddof 0), optionally the batch-wide std instead of the group's (Flow-GRPO's `global_std`). Statistics in
  float64 (as Flow-GRPO's NumPy tracker), and a group whose rewards are all equal gets exactly 0: in float32
  the mean of 16 x 0.42 is not 0.42, and that leftover divided by (0 + eps) gave every member -6e-4.
- `GroupStatTracker`: per-prompt running statistics over past rollouts (Flow-GRPO's per-prompt stat tracking),
  with the same exact 0 when the statistics' rewards are all equal.
- `informative_first`: which rollouts an update trains on when it keeps fewer than it rolled out: those with a
  non-zero advantage first (DAPO's dynamic sampling, arXiv 2503.14476, without rolling out again).
- `ppo_clip_loss`: the clipped surrogate of Eq. 5 as a loss, -mean(min(r A, clip(r, 1-e, 1+e) A)).
- `gaussian_step_kl`: KL between the policy's and the reference's Gaussian step distributions, which share
  the std: KL = ||mu_theta - mu_ref||^2 / (2 std^2) (Flow-GRPO Eq. 12), reduced like the log-probs.
- `step_kl`: the KL penalty as a run uses it, exact or scaled per step like the published code
  (`kl_recipe_factor`: x dt for Flow-GRPO's SDE, x 2 std^2 for FlowCPS), so published kl_beta values port.
- Training window over denoising steps: `noise_advantage_signal` (how much of the reward each step's injected
  noise explains), `update_step_scores` (EMA), `select_window` (best contiguous window), `fixed_window`;
  `logp_change_signal` is the alternative score measured on trained steps (advantage-weighted |dlogp|).
"""

from __future__ import annotations

from collections import defaultdict, deque

import torch

from lit_ovis.errors import ConfigError


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    eps: float = 1e-4,
    global_std: bool = False,
) -> torch.Tensor:
    """Group-normalised advantages [N] (float32) for rewards [N] and integer group ids [N] (any order).
    Members of a group whose rewards are all equal get exactly 0 (no signal), whatever the std in use."""
    r = rewards.detach().double()
    groups, inv = torch.unique(group_ids, return_inverse=True)
    g = groups.numel()
    zeros = torch.zeros(g, dtype=r.dtype, device=r.device)
    count = zeros.index_add(0, inv, torch.ones_like(r))
    mean = zeros.index_add(0, inv, r) / count
    lowest = zeros.scatter_reduce(0, inv, r, "amin", include_self=False)
    highest = zeros.scatter_reduce(0, inv, r, "amax", include_self=False)
    constant = (lowest == highest)[inv]
    centred = r - mean[inv]
    if global_std:
        std = r.std(unbiased=False).expand_as(r) if r.numel() > 1 else torch.zeros_like(r)
    else:
        std = (zeros.index_add(0, inv, centred**2) / count).sqrt()[inv]
    return torch.where(constant, torch.zeros_like(r), centred / (std + eps)).float()


def normalised_advantage(value: float, reference: torch.Tensor, eps: float) -> float:
    """(value - mean) / (std + eps) against a reference set of rewards that contains `value`; exactly 0
    when the reference rewards are all equal."""
    if bool(reference.max() == reference.min()):
        return 0.0
    return float((value - reference.mean()) / (reference.std(unbiased=False) + eps))


def informative_first(advantages: torch.Tensor, keep: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices of `keep` rollouts (ascending) for the update: every rollout with a non-zero advantage first (a
    random subset of them when there are more), then zero-advantage ones to fill. A zero advantage (a group
    whose images all scored the same) adds no policy gradient, only the KL term, so an update spent on such
    rollouts is wasted; a fixed `keep` keeps every rank's update the same length (FSDP collectives)."""
    n = advantages.numel()
    if not 0 < keep <= n:
        raise ValueError(f"informative_first keeps between 1 and {n} rollouts (all it was given), got {keep}")
    order = torch.randperm(n, generator=generator)
    informative = (advantages.detach().cpu()[order] != 0)
    # a stable sort on "is zero" keeps the random order within each class
    ranked = order[torch.sort((~informative).to(torch.int8), stable=True).indices]
    return torch.sort(ranked[:keep]).values


class GroupStatTracker:
    """Per-prompt reward statistics kept over the last `buffer_size` rollouts of that prompt, so small groups
    still get a stable baseline. Prompts seen fewer than `min_count` times fall back to the batch statistics."""

    def __init__(self, buffer_size: int = 32, min_count: int = 16, eps: float = 1e-4):
        self.buffer_size, self.min_count, self.eps = buffer_size, min_count, eps
        self.history: dict[str, deque] = defaultdict(lambda: deque(maxlen=self.buffer_size))

    def update(self, keys: list[str], rewards: torch.Tensor) -> torch.Tensor:
        r = rewards.detach().double().cpu()
        values = r.tolist()
        for k, v in zip(keys, values):
            self.history[k].append(v)
        out = []
        for k, v in zip(keys, values):
            hist = torch.tensor(list(self.history[k]), dtype=torch.float64)
            out.append(normalised_advantage(v, r if len(hist) < self.min_count else hist, self.eps))
        return torch.tensor(out, dtype=torch.float32, device=rewards.device)

    def clear(self) -> None:
        self.history.clear()


def log_ratio(log_prob: torch.Tensor, old_log_prob: torch.Tensor) -> torch.Tensor:
    """r = p_theta / p_old = exp(log p_theta - log p_old)."""
    return torch.exp(log_prob - old_log_prob)


def ppo_clip_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float = 1e-4,
    adv_clip_max: float | None = 5.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO surrogate as a loss to minimise, -mean(min(r A, clip(r) A)), plus ratio statistics.

    Flow-GRPO uses a tiny clip range (1e-4) because per-dimension-mean log-prob ratios move very little."""
    adv = advantages.float()
    if adv_clip_max is not None:
        adv = adv.clamp(-adv_clip_max, adv_clip_max)
    ratio = log_ratio(log_prob.float(), old_log_prob.float())
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {
            "ratio_mean": ratio.mean(),
            "ratio_min": ratio.min(),
            "ratio_max": ratio.max(),
            "clip_frac": ((ratio - 1.0).abs() > clip_range).float().mean(),
            "approx_kl_old": 0.5 * ((log_prob - old_log_prob).float() ** 2).mean(),
        }
    return loss, stats


def gaussian_step_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """KL(N(mean, s^2 I) || N(ref_mean, s^2 I)) per sample [B] = ||mean - ref_mean||^2 / (2 s^2), with the
    squared distance averaged (`reduce="mean"`, matching mean-reduced log-probs) or summed over dims."""
    sq = (mean.float() - ref_mean.float()) ** 2
    dims = tuple(range(1, sq.ndim))
    sq = sq.mean(dims) if reduce == "mean" else sq.sum(dims)
    std = std.float()
    return torch.where(std > 0, sq / (2.0 * torch.where(std > 0, std, torch.ones_like(std)) ** 2), torch.zeros_like(sq))


KL_SCALES = ("recipe", "exact")


def kl_recipe_factor(sampler: str, std: torch.Tensor, dt: torch.Tensor | float) -> torch.Tensor:
    """recipe KL / exact KL of one denoising step from t to t' (dt = t - t' > 0), as the published code computes it.

    - "sde" (Flow-GRPO's train_sd3.py): ||dmu||^2 / (2 sigma_t^2) with sigma_t = a sqrt(t / (1 - t)) the SDE's
      diffusion coefficient, while the step's std is sigma_t sqrt(dt): recipe = exact x dt.
    - "cps" (FlowCPS's train_sd3.py / train_flux.py): ||dmu||^2 with no Gaussian normalisation, its log-probs
      having dropped the 1 / (2 std^2): recipe = exact x 2 std^2, std = t' sin(eta pi / 2).
    """
    std = std.float()
    if sampler == "sde":
        return torch.as_tensor(dt, dtype=torch.float32, device=std.device).expand_as(std)
    if sampler == "cps":
        return 2.0 * std**2
    raise ConfigError(f"no published KL recipe for sampler {sampler!r}: use --model.grpo.update.kl_scale exact")


def step_kl(
    mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor, dt: torch.Tensor | float,
    sampler: str, scale: str = "recipe", reduce: str = "mean",
) -> torch.Tensor:
    """Per-sample KL penalty [B] of one denoising step: the exact Gaussian KL (`scale="exact"`) or the
    published code's form (`scale="recipe"`, see `kl_recipe_factor`)."""
    if scale not in KL_SCALES:
        raise ConfigError(f"--model.grpo.update.kl_scale must be one of {KL_SCALES}, got {scale!r}")
    kl = gaussian_step_kl(mean, ref_mean, std, reduce)
    return kl if scale == "exact" else kl * kl_recipe_factor(sampler, std, dt)


# ----------------------------------------------------------------------------------- training window
def noise_advantage_signal(noise: torch.Tensor, advantages: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Per-step reward signal [K] from the injected noise eps [N, K, ...] of N rollouts.

    The policy gradient at step k is E[A grad log p_k] = E[A eps_k / std_k * d mean_k/d theta], so the
    vector sum_i A_i eps_{k,i} (within groups) is the step's share of the gradient signal. Normalised by its
    expectation when rewards ignore the noise (sum_i A_i^2 per dim), the score is ~1 for a step whose
    noise does not affect the reward and grows with the reward that step's exploration explains. It needs
    only stored rollouts, so every step is scored on every iteration, trained or not. The excess over 1 is
    about G R_k^2 / D (R_k^2: reward variance linearly explained by step k's noise, D: latent dims), so at
    large resolutions it is small and needs the EMA of `update_step_scores` over many iterations."""
    n, k = noise.shape[:2]
    eps = noise.float().reshape(n, k, -1)
    a = advantages.float()
    _, inv = torch.unique(group_ids, return_inverse=True)
    g = int(inv.max()) + 1
    weighted = a[:, None, None] * eps  # [N, K, D]
    per_group = torch.zeros((g,) + weighted.shape[1:], device=eps.device).index_add_(0, inv, weighted)
    num = (per_group**2).sum(dim=(0, 2))  # [K]
    den = eps.shape[-1] * (a**2).sum()
    return num / den.clamp_min(1e-12)


def logp_change_signal(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """mean_i |A_i (log p_theta - log p_old)| for one step: how far the update moved that step's policy in
    reward-relevant directions. Only observable on trained steps (see `GRPOConfig.window_explore`)."""
    return (advantages.float() * (log_prob.detach().float() - old_log_prob.float())).abs().mean()


def update_step_scores(scores: torch.Tensor | None, new: torch.Tensor, decay: float = 0.9) -> torch.Tensor:
    """EMA of per-step scores (initialised from the first observation)."""
    if scores is None or scores.shape != new.shape:
        return new.clone()
    return decay * scores + (1.0 - decay) * new


def select_window(scores: torch.Tensor, size: int, valid: torch.Tensor | None = None) -> tuple[int, int]:
    """[start, end) of the contiguous window of `size` steps with the largest total score, among windows made
    only of valid (stochastic) steps. Ties go to the earliest (noisiest) window."""
    k = scores.numel()
    valid = torch.ones(k, dtype=torch.bool) if valid is None else valid.bool().cpu()
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise ConfigError("no stochastic denoising step to train on: set grpo.noise_level > 0")
    size = max(1, min(size, n_valid))
    s = scores.detach().float().cpu()
    best, best_start = None, None
    for start in range(0, k - size + 1):
        if not bool(valid[start:start + size].all()):
            continue
        total = float(s[start:start + size].sum())
        if best is None or total > best + 1e-12:
            best, best_start = total, start
    if best_start is None:  # valid steps are not contiguous: fall back to the first `size` valid ones' span
        idx = torch.nonzero(valid).flatten()[:size]
        return int(idx[0]), int(idx[-1]) + 1
    return best_start, best_start + size


def fixed_window(num_steps: int, start: int, size: int, valid: torch.Tensor | None = None) -> tuple[int, int]:
    """[start, start + size) clipped to the stochastic steps (size <= 0 means all of them)."""
    last = num_steps if valid is None else int(torch.nonzero(valid.bool()).flatten().max()) + 1
    start = min(max(start, 0), last - 1)
    end = last if size <= 0 else min(start + size, last)
    return start, end


def sliding_window_start(iteration: int, num_valid: int, size: int, shift_every: int, stride: int = 1) -> int:
    """MixGRPO-style schedule (Li et al. 2025, arXiv 2507.21802): train the `size` noisiest steps first, then
    move the window `stride` steps towards the clean end every `shift_every` iterations, and stay at the end."""
    size = max(1, min(size, num_valid))
    return min((iteration // max(shift_every, 1)) * max(stride, 1), num_valid - size)
