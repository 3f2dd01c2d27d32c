"""GRPO losses: group advantages, PPO clip surrogate, Gaussian step KL and the training window."""

from __future__ import annotations

import pytest
import torch

from lit_ovis.losses.grpo import (
    GroupStatTracker, fixed_window, gaussian_step_kl, group_advantages, informative_first, kl_recipe_factor, noise_advantage_signal,
    ppo_clip_loss, select_window, step_kl, update_step_scores,
)
from lit_ovis.errors import ConfigError
from lit_ovis.sampling.generate import SamplingConfig
from lit_ovis.sampling.ode import sigma_schedule
from lit_ovis.sampling.sde import cps_step, sde_step


def test_group_advantages_zero_mean_unit_std_per_group():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(12, generator=g) * 3 + 5
    ids = torch.tensor([2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1])  # interleaved groups of 4
    adv = group_advantages(rewards, ids, eps=0.0)
    for k in range(3):
        a = adv[ids == k]
        assert abs(a.mean().item()) < 1e-5
        assert abs(a.std(unbiased=False).item() - 1.0) < 1e-5
    # hand value for one member
    r0 = rewards[ids == 0]
    torch.testing.assert_close(adv[1], (rewards[1] - r0.mean()) / r0.std(unbiased=False))


def test_group_advantages_constant_group_and_global_std():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 2.0, 4.0])
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = group_advantages(rewards, ids)
    assert torch.equal(adv[:3], torch.zeros(3))  # equal rewards: no signal, no NaN
    glob = group_advantages(rewards, ids, eps=0.0, global_std=True)
    torch.testing.assert_close(glob[3:], (rewards[3:] - 2.0) / rewards.std(unbiased=False))


@pytest.mark.parametrize("size,value", [(16, 0.42), (24, 0.7)])
def test_identical_rewards_give_exactly_zero_advantages(size, value):
    """Flow-GRPO's tracker gives exactly 0 here; a float32 mean left -6e-4 (16 x 0.42) and +1.2e-3 (24 x 0.7)."""
    rewards = torch.full((size,), value)
    ids = torch.zeros(size, dtype=torch.long)
    zero = torch.zeros(size)
    assert torch.equal(group_advantages(rewards, ids), zero)
    assert torch.equal(group_advantages(rewards, ids, global_std=True), zero)
    assert torch.equal(GroupStatTracker(buffer_size=64, min_count=size).update(["p"] * size, rewards), zero)  # history
    assert torch.equal(GroupStatTracker(min_count=10 * size).update(["p"] * size, rewards), zero)  # batch fallback


def test_a_constant_group_is_zero_next_to_a_varying_one():
    varying = torch.linspace(0.1, 0.9, 8)
    ids = torch.tensor([7] * 24 + [3] * 8)[torch.randperm(32, generator=torch.Generator().manual_seed(0))]
    rewards = torch.where(ids == 7, 0.7, 0.0)
    rewards[ids == 3] = varying
    eps = 1e-4
    v = varying.double()
    adv = group_advantages(rewards, ids, eps=eps)
    assert torch.equal(adv[ids == 7], torch.zeros(24))
    torch.testing.assert_close(adv[ids == 3], ((v - v.mean()) / (v.std(unbiased=False) + eps)).float())
    glob = group_advantages(rewards, ids, eps=eps, global_std=True)  # the batch std is not 0, the group still is
    assert torch.equal(glob[ids == 7], torch.zeros(24))
    torch.testing.assert_close(glob[ids == 3], ((v - v.mean()) / (rewards.double().std(unbiased=False) + eps)).float())
    keys = ["c" if int(i) == 7 else "v" for i in ids]
    tracked = GroupStatTracker(buffer_size=32, min_count=8, eps=eps).update(keys, rewards)
    assert torch.equal(tracked[ids == 7], torch.zeros(24))
    torch.testing.assert_close(tracked[ids == 3], ((v - v.mean()) / (v.std(unbiased=False) + eps)).float())


def test_informative_first_keeps_signal_before_zero_advantage_rollouts():
    # 4 groups of 4: groups 0 and 2 scored unanimously (advantage exactly 0), groups 1 and 3 did not
    ids = torch.arange(4).repeat_interleave(4)
    rewards = torch.tensor([0.9] * 4 + [0.0, 0.5, 1.0, 1.0] + [0.2] * 4 + [0.1, 0.1, 0.3, 0.8])
    adv = group_advantages(rewards, ids)
    informative = (adv != 0).nonzero().squeeze(1)
    assert informative.tolist() == [4, 5, 6, 7, 12, 13, 14, 15]
    # exactly as many as are informative: those, in ascending order, whatever the generator
    for seed in range(3):
        assert informative_first(adv, 8, torch.Generator().manual_seed(seed)).tolist() == informative.tolist()
    # more than informative: all of those plus zero-advantage rollouts to fill
    kept = informative_first(adv, 11, torch.Generator().manual_seed(0))
    assert set(informative.tolist()) <= set(kept.tolist()) and kept.numel() == kept.unique().numel() == 11
    # fewer: a random subset of the informative ones, different across draws, never a zero-advantage one
    draws = {tuple(informative_first(adv, 3, torch.Generator().manual_seed(s)).tolist()) for s in range(20)}
    assert len(draws) > 1 and all(set(d) <= set(informative.tolist()) for d in draws)
    # a group's rollout whose reward equals the group mean has advantage 0 and goes after the rest
    mean_hit = group_advantages(torch.tensor([0.0, 0.5, 1.0, 0.3, 0.3, 0.3]), torch.tensor([0, 0, 0, 1, 1, 1]))
    assert informative_first(mean_hit, 2, torch.Generator().manual_seed(0)).tolist() == [0, 2]
    assert torch.equal(informative_first(adv, 16), torch.arange(16))
    with pytest.raises(ValueError, match="between 1 and 16"):
        informative_first(adv, 17)


def test_stat_tracker_uses_history_after_min_count():
    tr = GroupStatTracker(buffer_size=8, min_count=4, eps=0.0)
    a = tr.update(["p", "p", "q", "q"], torch.tensor([1.0, 3.0, 10.0, 14.0]))
    batch = torch.tensor([1.0, 3.0, 10.0, 14.0])
    torch.testing.assert_close(a, (batch - batch.mean()) / batch.std(unbiased=False))  # too few: batch stats
    b = tr.update(["p", "p"], torch.tensor([5.0, 7.0]))
    hist = torch.tensor([1.0, 3.0, 5.0, 7.0])
    torch.testing.assert_close(b, (torch.tensor([5.0, 7.0]) - hist.mean()) / hist.std(unbiased=False))


def test_unchanged_weights_ratio_one_and_loss_minus_mean_adv():
    lp = torch.randn(8, dtype=torch.float64).float()
    adv = torch.randn(8)
    loss, stats = ppo_clip_loss(lp.clone(), lp.clone(), adv, clip_range=0.2)
    assert stats["ratio_mean"].item() == 1.0 and stats["clip_frac"].item() == 0.0
    torch.testing.assert_close(loss, -adv.mean())


def test_clipping_hand_values_and_gradient():
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5])).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, stats = ppo_clip_loss(new, old, adv, clip_range=0.2, adv_clip_max=None)
    # per-sample: max(-A r, -A clip(r)): [-1.2, 1.5, -0.5, 0.8]
    torch.testing.assert_close(loss, torch.tensor((-1.2 + 1.5 - 0.5 + 0.8) / 4))
    assert stats["clip_frac"].item() == 1.0
    loss.backward()
    # gradient only where the unclipped term is active (samples 1 and 2): d(-A r)/dlogp = -A r / 4
    torch.testing.assert_close(new.grad, torch.tensor([0.0, 1.5 / 4, -0.5 / 4, 0.0]))


def test_gaussian_step_kl_matches_closed_form_and_log_prob_difference():
    g = torch.Generator().manual_seed(0)
    x, v, v_ref = (torch.randn(2, 6, 4, generator=g) for _ in range(3))
    a = sde_step(x, v, 0.7, 0.5, noise_level=0.8, generator=g)
    b = sde_step(x, v_ref, 0.7, 0.5, noise_level=0.8, prev_sample=a.sample)
    kl = gaussian_step_kl(a.mean, b.mean, a.std, reduce="sum")
    torch.testing.assert_close(kl, ((a.mean - b.mean) ** 2).sum(dim=(1, 2)) / (2 * a.std**2))
    # Monte-Carlo check against E_p[log p - log q] (same std): sample many x' from p
    n = 4000
    xs = a.mean[0] + a.std[0] * torch.randn((n,) + a.mean.shape[1:], generator=g)
    from torch.distributions import Normal
    lp = Normal(a.mean[0], a.std[0]).log_prob(xs).sum(dim=(1, 2))
    lq = Normal(b.mean[0], a.std[0]).log_prob(xs).sum(dim=(1, 2))
    assert abs((lp - lq).mean().item() - kl[0].item()) < 0.05 * kl[0].item() + 0.05
    mean_kl = gaussian_step_kl(a.mean, b.mean, a.std)
    torch.testing.assert_close(mean_kl, kl / 24)


def test_recipe_kl_equals_the_published_formulas_by_hand():
    """kl_scale="recipe" is the published code's KL: Flow-GRPO's SDE divides by 2 sigma_t^2 without the step's dt,
    FlowCPS's CPS drops the Gaussian 1/(2 std^2). Hand values of sigma_t, dt and std, same stored transition."""
    g = torch.Generator().manual_seed(0)
    x, v, v_ref = (torch.randn(2, 6, 4, generator=g) for _ in range(3))
    # SDE, t = 0.8 -> 0.7, a = 0.7: sigma_t = 0.7 sqrt(0.8 / 0.2) = 1.4, dt = 0.1, std = 1.4 sqrt(0.1)
    p = sde_step(x, v, 0.8, 0.7, noise_level=0.7, generator=g)
    q = sde_step(x, v_ref, 0.8, 0.7, noise_level=0.7, prev_sample=p.sample)
    sq = ((p.mean - q.mean) ** 2).mean(dim=(1, 2))
    recipe = step_kl(p.mean, q.mean, p.std, 0.1, "sde", "recipe")
    exact = step_kl(p.mean, q.mean, p.std, 0.1, "sde", "exact")
    torch.testing.assert_close(recipe, sq / (2 * 1.4**2))
    torch.testing.assert_close(exact, sq / (2 * 1.4**2 * 0.1))
    torch.testing.assert_close(exact, gaussian_step_kl(p.mean, q.mean, p.std))  # exact = the previous KL
    # the first step (t = 1): Flow-GRPO puts 1 - t' in sigma_t's denominator, sigma_t = 0.7 sqrt(1 / 0.04) = 3.5
    p = sde_step(x, v, 1.0, 0.96, noise_level=0.7, generator=g)
    q = sde_step(x, v_ref, 1.0, 0.96, noise_level=0.7, prev_sample=p.sample)
    sq = ((p.mean - q.mean) ** 2).mean(dim=(1, 2))
    torch.testing.assert_close(step_kl(p.mean, q.mean, p.std, 0.04, "sde"), sq / (2 * 3.5**2))
    # CPS, t = 0.8 -> 0.5, eta = 0.7: std = 0.5 sin(0.35 pi) = 0.44550
    p = cps_step(x, v, 0.8, 0.5, noise_level=0.7, generator=g)
    q = cps_step(x, v_ref, 0.8, 0.5, noise_level=0.7, prev_sample=p.sample)
    sq = ((p.mean - q.mean) ** 2).mean(dim=(1, 2))
    torch.testing.assert_close(step_kl(p.mean, q.mean, p.std, 0.3, "cps", "recipe"), sq)
    torch.testing.assert_close(step_kl(p.mean, q.mean, p.std, 0.3, "cps", "exact"), sq / (2 * 0.44550326**2))
    # a hand number: every dim's mean differs by 0.1
    mu = torch.zeros(1, 4, 4)
    torch.testing.assert_close(step_kl(mu + 0.1, mu, torch.tensor([1.4 * 0.1**0.5]), 0.1, "sde"), torch.tensor([0.01 / 3.92]))
    with pytest.raises(ConfigError, match="kl_scale"):
        step_kl(mu, mu, torch.ones(1), 0.1, "sde", "paper")


def test_exact_over_recipe_factor_on_the_grpo_config_schedule():
    """The conversion the kl_scale docstring states: 10 rollout steps at 1024^2 (configs/grpo.yaml), CPS eta 0.7."""
    s = SamplingConfig()
    sigmas = sigma_schedule(10, (1024 // 16) ** 2, s.base_seq_len, s.max_seq_len, s.base_shift, s.max_shift)
    t, t_next = sigmas[:-1], sigmas[1:]
    sde = 1 / kl_recipe_factor("sde", sde_step(torch.zeros(10, 4), torch.zeros(10, 4), t, t_next).std, t - t_next)
    assert sde.min().item() == pytest.approx(3.85, abs=0.01) and sde.max().item() == pytest.approx(29.4, abs=0.1)
    stochastic = t_next > 0  # the last CPS step (to t' = 0) is deterministic and never trained
    std = cps_step(torch.zeros(10, 4), torch.zeros(10, 4), t, t_next, noise_level=0.7).std[stochastic]
    cps = 1 / kl_recipe_factor("cps", std, (t - t_next)[stochastic])
    assert cps.min().item() == pytest.approx(0.67, abs=0.01) and cps.max().item() == pytest.approx(9.33, abs=0.01)


def test_noise_signal_finds_the_step_that_drives_the_reward():
    g = torch.Generator().manual_seed(0)
    n, k, d = 64, 6, 16
    noise = torch.randn(n, k, d, generator=g)
    ids = torch.arange(n) // 8
    rewards = noise[:, 3].sum(-1) + 0.1 * torch.randn(n, generator=g)  # only step 3's noise matters
    adv = group_advantages(rewards, ids)
    s = noise_advantage_signal(noise, adv, ids)
    # expected ~1 + G/D = 1.5 for the driving step (G = 8 members, D = 16 dims), ~1 elsewhere
    assert int(s.argmax()) == 3 and s[3] > 1.3
    others = torch.cat([s[:3], s[4:]])
    assert (others < 1.25).all() and (others > 0.6).all()  # ~1 when the noise is irrelevant
    # window around it, respecting validity and EMA
    scores = update_step_scores(None, s)
    assert select_window(scores, 1) == (3, 4)
    start, end = select_window(scores, 2)
    assert start <= 3 < end and end - start == 2
    valid = torch.tensor([True, True, True, False, True, True])
    assert 3 not in range(*select_window(scores, 2, valid))
    ema = update_step_scores(scores, torch.zeros(k), decay=0.5)
    torch.testing.assert_close(ema, 0.5 * scores)


def test_fixed_window():
    assert fixed_window(10, 2, 4) == (2, 6)
    assert fixed_window(10, 8, 4) == (8, 10)
    valid = torch.tensor([True] * 9 + [False])
    assert fixed_window(10, 0, 0, valid) == (0, 9)


def test_sliding_window_moves_from_noisy_to_clean_and_stops_at_the_end():
    from lit_ovis.losses.grpo import sliding_window_start

    starts = [sliding_window_start(it, num_valid=9, size=4, shift_every=2, stride=1) for it in range(14)]
    assert starts == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 5, 5]  # 9 stochastic steps, window of 4: last start 5
    assert sliding_window_start(100, num_valid=3, size=4, shift_every=1) == 0  # window wider than the steps
