"""Flow-GRPO SDE and CPS steps: exact Gaussian log-probs, reduction to Euler at zero noise, edge steps."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from lit_ovis.sampling.ode import euler_step
from lit_ovis.sampling.sde import cps_step, gaussian_log_prob, ode_step, sampler_step, sde_step, step_noise


def _state(b=3, n=5, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, d, generator=g), torch.randn(b, n, d, generator=g)


def test_sde_mean_std_match_hand_derivation():
    x, v = _state()
    t, tn, a = 0.6, 0.45, 0.7
    out = sde_step(x, v, t, tn, noise_level=a, generator=torch.Generator().manual_seed(1))
    sig = a * math.sqrt(t / (1 - t))
    mean = x + (v + sig**2 / (2 * t) * (x + (1 - t) * v)) * (tn - t)
    torch.testing.assert_close(out.mean, mean)
    torch.testing.assert_close(out.std, torch.full((3,), sig * math.sqrt(t - tn)))


@pytest.mark.parametrize("step", [sde_step, cps_step])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_log_prob_equals_normal_density(step, reduce):
    x, v = _state()
    out = step(x, v, 0.8, 0.55, noise_level=0.7, generator=torch.Generator().manual_seed(2))
    std = out.std[:, None, None].expand_as(x)
    lp = Normal(out.mean, std).log_prob(out.sample)
    ref = lp.mean(dim=(1, 2)) if reduce == "mean" else lp.sum(dim=(1, 2))
    got = step(x, v, 0.8, 0.55, noise_level=0.7, prev_sample=out.sample, reduce=reduce).log_prob
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # and the log-prob of an arbitrary other next latent
    other = torch.randn_like(x)
    got = step(x, v, 0.8, 0.55, noise_level=0.7, prev_sample=other, reduce=reduce).log_prob
    lp = Normal(out.mean, std).log_prob(other)
    torch.testing.assert_close(got, lp.mean(dim=(1, 2)) if reduce == "mean" else lp.sum(dim=(1, 2)), rtol=1e-5, atol=1e-4)


def test_cps_coefficients():
    x, v = _state()
    t, tn, eta = 0.7, 0.4, 0.5
    noise = torch.randn_like(x)
    out = cps_step(x, v, t, tn, noise_level=eta, noise=noise)
    x0, x1 = x - t * v, x + (1 - t) * v
    expect = (1 - tn) * x0 + tn * math.cos(eta * math.pi / 2) * x1 + tn * math.sin(eta * math.pi / 2) * noise
    torch.testing.assert_close(out.sample, expect)
    # coefficients preserved: x1 and noise coefficients add in quadrature to t'
    assert math.isclose((tn * math.cos(eta * math.pi / 2)) ** 2 + out.std[0].item() ** 2, tn**2, rel_tol=1e-6)
    torch.testing.assert_close(step_noise(out), noise)


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_zero_noise_reduces_to_euler(kind):
    x, v = _state()
    for t, tn in [(1.0, 0.9), (0.6, 0.3), (0.2, 0.0)]:
        out = sampler_step(kind, x, v, t, tn, noise_level=0.0, generator=torch.Generator().manual_seed(3))
        euler = euler_step(x, v, torch.tensor(t), torch.tensor(tn))
        torch.testing.assert_close(out.sample, euler, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out.mean, euler, rtol=1e-6, atol=1e-6)
        assert not out.stochastic and torch.equal(out.log_prob, torch.zeros(3))
    torch.testing.assert_close(ode_step(x, v, 0.5, 0.25).sample, x - 0.25 * v)


def test_edges_first_and_last_step_are_finite():
    x, v = _state()
    first = sde_step(x, v, 1.0, 0.9, noise_level=0.7, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(first.sample).all() and torch.isfinite(first.log_prob).all()
    # t = 1 uses 1 - t' in sigma_t's denominator
    torch.testing.assert_close(first.std, torch.full((3,), 0.7 * math.sqrt(1.0 / 0.1) * math.sqrt(0.1)))
    last = sde_step(x, v, 0.1, 0.0, noise_level=0.7, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(last.log_prob).all() and last.stochastic
    cps_last = cps_step(x, v, 0.1, 0.0, noise_level=0.7)
    torch.testing.assert_close(cps_last.sample, x - 0.1 * v)  # x0_hat exactly, deterministic
    assert not cps_last.stochastic and torch.equal(cps_last.log_prob, torch.zeros(3))


def test_per_sample_times_and_grad_flows_through_mean():
    x, v = _state()
    v.requires_grad_(True)
    t = torch.tensor([0.9, 0.5, 0.3])
    tn = torch.tensor([0.8, 0.4, 0.1])
    prev = torch.randn_like(x)
    out = sde_step(x, v, t, tn, noise_level=0.5, prev_sample=prev)
    for i in range(3):
        one = sde_step(x[i:i + 1], v[i:i + 1], t[i], tn[i], noise_level=0.5, prev_sample=prev[i:i + 1])
        torch.testing.assert_close(out.log_prob[i:i + 1], one.log_prob)
    out.log_prob.sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0


def test_gaussian_log_prob_rejects_bad_reduce():
    with pytest.raises(ValueError, match="reduce"):
        gaussian_log_prob(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), reduce="max")


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_rollout_loop_matches_ode_sampler_at_zero_noise_and_stores_log_probs(tiny_backbone, kind):
    from lit_ovis.models.text_encoder import text_ids
    from lit_ovis.models.vae import latent_image_ids
    from lit_ovis.sampling.ode import euler_sample, sigma_schedule, velocity
    from lit_ovis.sampling.sde import sde_sample

    g = torch.Generator().manual_seed(0)
    dim = tiny_backbone.config.joint_attention_dim
    x = torch.randn(2, 4, 64, generator=g)
    emb, neg = torch.randn(2, 8, dim, generator=g), torch.randn(2, 8, dim, generator=g)
    txt, img = text_ids(8), latent_image_ids(4, 4)
    sigmas = sigma_schedule(4, 4)
    ode = euler_sample(tiny_backbone, x, emb, txt, img, sigmas, negative_embeds=neg, guidance_scale=3.0)
    traj0 = sde_sample(tiny_backbone, x, emb, txt, img, sigmas, kind, 0.0, neg, 3.0)
    torch.testing.assert_close(traj0.latents[:, -1], ode, rtol=1e-5, atol=1e-5)
    traj = sde_sample(tiny_backbone, x, emb, txt, img, sigmas, kind, 0.7, neg, 3.0, generator=g)
    assert traj.latents.shape == (2, 5, 4, 64) and traj.log_probs.shape == (2, 4)
    # each stored log-prob is the density of the stored transition under the same model
    with torch.no_grad():
        for k in range(4):
            v = velocity(tiny_backbone, traj.latents[:, k], sigmas[k], emb, txt, img, neg, guidance_scale=3.0)
            out = sampler_step(kind, traj.latents[:, k], v, sigmas[k], sigmas[k + 1], noise_level=0.7,
                               prev_sample=traj.latents[:, k + 1])
            torch.testing.assert_close(out.log_prob, traj.log_probs[:, k])
            torch.testing.assert_close(step_noise(out), traj.noise[:, k], rtol=1e-4, atol=1e-4)
    assert (traj.std[:3] > 0).all() and (traj.std[3] > 0) == (kind == "sde")
