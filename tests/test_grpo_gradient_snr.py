"""The gradient signal-to-noise estimate of `benchmarks/bench_grpo_gradient.py` on synthetic batch gradients
with a known mean and noise: mean + noise / sqrt(N) per batch."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_grpo_gradient import snr  # noqa: E402


def synthetic_batches(signal_norm: float, noise_per_rollout: float, rollouts: int, batches: int, dim: int = 200_000):
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(dim, generator=gen)
    mu *= signal_norm / mu.norm()
    # one batch = mean of `rollouts` draws: noise of trace-variance noise_per_rollout^2 / rollouts
    return [mu + torch.randn(dim, generator=gen) * noise_per_rollout / (dim * rollouts) ** 0.5 for _ in range(batches)], mu


def test_recovers_signal_noise_and_the_rollouts_needed():
    batches, mu = synthetic_batches(signal_norm=1.0, noise_per_rollout=10.0, rollouts=25, batches=8)
    r = snr(batches, rollouts_per_batch=25)
    assert r["signal"] == pytest.approx(1.0, rel=0.05)  # |mu|^2
    assert r["noise"] == pytest.approx(100.0 / 25, rel=0.05)  # v / N
    # expected cosine of two batches: |mu|^2 / (|mu|^2 + v / N) = 1 / 5
    assert r["cos_mean"] == pytest.approx(0.2, abs=0.02)
    assert 0 < r["cos_se"] < 0.05 and abs(r["cos_mean"] - 0.2) < 4 * r["cos_se"] + 1e-3
    # equal signal and noise norms at N = v / |mu|^2 = 100 rollouts
    assert r["rollouts_for_cos_0.7"] == pytest.approx(100.0, rel=0.08)
    # check that claim directly: a batch of 100 rollouts is at cosine ~0.707 to the true gradient
    big, _ = synthetic_batches(signal_norm=1.0, noise_per_rollout=10.0, rollouts=100, batches=1)
    assert torch.nn.functional.cosine_similarity(big[0], mu, dim=0).item() == pytest.approx(0.707, abs=0.02)


def test_pure_noise_has_no_measured_signal_and_zero_batches_are_skipped():
    batches, _ = synthetic_batches(signal_norm=0.0, noise_per_rollout=1.0, rollouts=4, batches=6)
    r = snr(batches, rollouts_per_batch=4)
    assert abs(r["cos_mean"]) < 0.01 and abs(r["signal"]) < 0.01 * r["noise"]
    with_empty = snr([torch.zeros(10), torch.ones(10), torch.ones(10)], rollouts_per_batch=4)
    assert with_empty["cos_mean"] == pytest.approx(1.0)


def test_batch_gradients_are_each_rewards_surrogate_gradient_from_one_forward():
    """On a tiny module: rollouts, then one gradient pass for several advantage vectors. Each equals the plain
    backward of its own surrogate mean_i,k A_i log p, and the gradient is linear in the advantages."""
    from argparse import Namespace

    from bench_grpo_gradient import batch_gradients, rollouts
    from helpers import tiny_flow_module
    from lit_ovis.sampling.ode import velocity
    from lit_ovis.sampling.sde import sampler_step

    torch.manual_seed(0)
    module = tiny_flow_module()
    module.backbone.requires_grad_(True)
    args = Namespace(group_size=3, height=32, width=32, steps=4, noise_level=0.7, update_batch=4)
    traj, images, cond = rollouts(module, ["a red 'OPEN' sign", "blue 'SALE'"], args, seed=3)
    assert images.shape == (6, 3, 32, 32) and traj.latents.shape[1] == 5
    adv = torch.tensor([1.0, -1.0, 0.0, 0.5, -0.5, 0.0])
    grads, _ = batch_gradients(module, traj, cond, {"a": adv, "b": 2 * adv, "zero": torch.zeros(6)}, args)
    assert torch.allclose(grads["b"], 2 * grads["a"], atol=1e-9) and grads["zero"].abs().max() == 0
    module.backbone.zero_grad(set_to_none=True)
    steps = [k for k in range(4) if traj.std[k] > 0]
    total = 0.0
    for k in steps:
        v = velocity(module.backbone, traj.latents[:, k], traj.sigmas[k], cond["embeds"], cond["txt"], cond["img"],
                     cond["negative"], guidance_scale=module.sampling_cfg.guidance_scale)
        total = total + (adv * sampler_step("cps", traj.latents[:, k], v, traj.sigmas[k], traj.sigmas[k + 1],
                                            noise_level=0.7, prev_sample=traj.latents[:, k + 1]).log_prob).sum()
    (total / (6 * len(steps))).backward()
    direct = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel())
                        for p in module.backbone.parameters() if p.requires_grad])
    assert grads["a"].abs().max() > 0
    assert torch.allclose(grads["a"], direct, rtol=1e-4, atol=1e-8)
