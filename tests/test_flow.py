"""Flow-matching math against hand-computed values and autograd."""

from __future__ import annotations

import math

import pytest
import torch

from lit_ovis import flow


def test_interpolation_and_target_by_hand():
    x0 = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    noise = torch.tensor([[0.0, 1.0], [-1.0, 1.0]])
    t = torch.tensor([0.25, 0.5])
    xt = flow.interpolate(x0, noise, t)
    assert torch.allclose(xt, torch.tensor([[0.75, 1.75], [1.0, 0.0]]))
    v = flow.velocity_target(x0, noise)
    assert torch.allclose(v, torch.tensor([[-1.0, -1.0], [-4.0, 2.0]]))
    # Following the velocity from x_t for time t lands on x0 exactly.
    assert torch.allclose(flow.predicted_x0(xt, v, t), x0)


def test_loss_equals_hand_computed_value_and_gradient():
    pred = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]], requires_grad=True)
    target = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    loss, per_sample = flow.flow_matching_loss(pred, target)
    # sample 0: (1 + 0 + 4) / 3 = 5/3; sample 1: (1 + 1 + 1) / 3 = 1; mean = 4/3
    assert torch.allclose(per_sample, torch.tensor([5 / 3, 1.0]))
    assert math.isclose(loss.item(), 4 / 3, rel_tol=1e-6)
    loss.backward()
    # d/dpred of mean_b mean_d (pred - target)^2 = 2 (pred - target) / (B * D)
    assert torch.allclose(pred.grad, 2 * (pred.detach() - target) / 6)

    weighted, _ = flow.flow_matching_loss(pred.detach(), target, torch.tensor([2.0, 0.5]))
    assert math.isclose(weighted.item(), (2 * 5 / 3 + 0.5 * 1) / 2, rel_tol=1e-6)


def test_shifts_by_hand():
    t = torch.tensor([0.5, 0.25])
    assert torch.allclose(flow.shift_static(t, 3.0), torch.tensor([0.75, 0.5]))
    mu = flow.resolution_shift_mu(4096)
    assert math.isclose(mu, 1.15, rel_tol=1e-9)
    assert math.isclose(flow.resolution_shift_mu(256), 0.5, rel_tol=1e-9)
    shifted = flow.shift_timesteps(t, "dynamic", image_seq_len=4096)
    expected = math.exp(1.15) / (math.exp(1.15) + (1 / t - 1))
    assert torch.allclose(shifted, expected)
    assert torch.equal(flow.shift_timesteps(t, "none"), t)
    with pytest.raises(ValueError, match="unknown timestep shift"):
        flow.shift_timesteps(t, "bogus")


def test_timestep_sampling_distributions():
    g = torch.Generator().manual_seed(0)
    u = flow.sample_timesteps(20000, "uniform", generator=g)
    ln = flow.sample_timesteps(20000, "logit_normal", logit_mean=0.0, logit_std=1.0, generator=g)
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    # logit of a logit-normal sample is normal(0, 1)
    logits = torch.log(ln / (1 - ln))
    assert abs(logits.mean().item()) < 0.03 and abs(logits.std().item() - 1.0) < 0.03


def test_loss_weights_by_hand():
    t = torch.tensor([0.5, 0.1])
    assert torch.allclose(flow.loss_weights(t, "cosmap"), 2 / (math.pi * (1 - 2 * t + 2 * t**2)))
    assert torch.allclose(flow.loss_weights(t, "sigma_sqrt"), torch.tensor([4.0, 100.0]))
    assert torch.equal(flow.loss_weights(t, "none"), torch.ones(2))


def test_caption_dropout_swaps_in_empty_prompt():
    embeds = torch.ones(4, 3, 2)
    empty = torch.full((1, 3, 2), 7.0)
    drop = torch.tensor([True, False, True, False])
    out = flow.apply_caption_dropout(embeds, empty, drop)
    assert torch.equal(out[0], empty[0]) and torch.equal(out[1], embeds[1])
    rate = flow.caption_dropout_mask(100000, 0.1, torch.Generator().manual_seed(0)).float().mean().item()
    assert abs(rate - 0.1) < 0.005
    assert not flow.caption_dropout_mask(8, 0.0).any()


def test_timestep_buckets():
    assert flow.timestep_buckets(torch.tensor([0.0, 0.24, 0.25, 0.99, 1.0]), 4).tolist() == [0, 0, 1, 3, 3]
