"""Diffusion-DPO / Diffusion-SDPO pure functions: hand-computed values, autograd brute force, first-order safety."""

from __future__ import annotations

import math

import pytest
import torch

from lit_ovis.losses.dpo import SafeguardConfig, diffusion_dpo_loss, mse_output_grad, sdpo_lambda, sdpo_loss


def test_dpo_loss_matches_hand_computation():
    # Pair 0: L_w = (1 + 4)/2 = 2.5, ref_w = 1, L_l = 0.5, ref_l = 0.5 -> z = -(0.4/2)(1.5 - 0) = -0.3
    # Pair 1: L_w = 0, ref_w = 0.5, L_l = 2, ref_l = 0 -> z = -(0.4/2) * 2 * (-0.5 - 2) = 1.0 (weight 2)
    pred_w = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    ref_w = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    pred_l = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    ref_l = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    zeros = torch.zeros(2, 2)
    loss, st = diffusion_dpo_loss(pred_w, pred_l, zeros, zeros, ref_w, ref_l, beta=0.4, weights=torch.tensor([1.0, 2.0]))
    z = torch.tensor([-0.3, 1.0])
    expected = (math.log1p(math.exp(0.3)) + math.log1p(math.exp(-1.0))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert st["implicit_acc"].item() == pytest.approx(0.5)
    assert st["reward_margin"].item() == pytest.approx(z.mean().item(), rel=1e-6)
    assert st["policy_loss_w"].item() == pytest.approx((2.5 + 0.0) / 2)
    assert st["policy_loss_l"].item() == pytest.approx((0.5 + 2.0) / 2)
    assert st["ref_loss_w"].item() == pytest.approx((1.0 + 0.5) / 2)
    assert st["ref_loss_l"].item() == pytest.approx((0.5 + 0.0) / 2)
    # reward margin is reward_w - reward_l
    assert (st["reward_w"] - st["reward_l"]).item() == pytest.approx(st["reward_margin"].item(), rel=1e-5)


def test_policy_equal_reference_gives_log2_and_half_accuracy():
    g = torch.Generator().manual_seed(0)
    pw, pl, tw, tl = (torch.randn(5, 4, 16, generator=g) for _ in range(4))
    loss, st = diffusion_dpo_loss(pw, pl, tw, tl, pw.clone(), pl.clone(), beta=5000.0)
    assert loss.item() == pytest.approx(math.log(2.0), abs=1e-7)
    assert st["implicit_acc"].item() == 0.5
    assert st["reward_margin"].item() == 0.0


def test_reference_gets_no_gradient_and_policy_gradient_is_dpo():
    g = torch.Generator().manual_seed(1)
    pw, pl, tw, tl, rw, rl = (torch.randn(3, 8, generator=g) for _ in range(6))
    pw.requires_grad_(True)
    rw.requires_grad_(True)
    loss, _ = diffusion_dpo_loss(pw, pl, tw, tl, rw, rl, beta=2.0)
    loss.backward()
    assert rw.grad is None
    # d loss / d L^w_i = (1/B) * sigma(-z_i) * beta / 2
    lw = ((pw - tw) ** 2).mean(1)
    z = -1.0 * ((lw - ((rw - tw) ** 2).mean(1)) - (((pl - tl) ** 2).mean(1) - ((rl - tl) ** 2).mean(1)))
    expected = (torch.sigmoid(-z) * 1.0 / 3)[:, None] * 2 * (pw - tw) / 8
    torch.testing.assert_close(pw.grad, expected.detach())


def _brute_force_lambda(pw, tw, pl, tl, mu, lmin, lmax, eps=1e-12, margin=0.0):
    pw = pw.clone().requires_grad_(True)
    pl = pl.clone().requires_grad_(True)
    Lw = ((pw - tw) ** 2).flatten(1).mean(1)
    Ll = ((pl - tl) ** 2).flatten(1).mean(1)
    # samples are independent, so the gradient of the sum gives every sample's own output-space gradient
    gw = torch.autograd.grad(Lw.sum(), pw)[0].flatten(1)
    gl = torch.autograd.grad(Ll.sum(), pl)[0].flatten(1)
    out = []
    for i in range(pw.shape[0]):
        inner = float(gw[i] @ gl[i])
        gw2 = float(gw[i] @ gw[i])
        lam = mu * inner / (float(gl[i] @ gl[i]) + eps)
        hi = min(lmax, (1 - margin) * gw2 / inner) if inner > 0 else lmax
        lo = min(max(lmin, 0.0), hi)
        out.append((min(max(lam, lo), hi), inner, gw2))
    return out


@pytest.mark.parametrize("mu,lmin,lmax", [(1.0, 0.0, 1.0), (3.0, 0.0, 10.0), (0.5, 0.1, 0.8)])
def test_lambda_matches_autograd_brute_force_and_bounds(mu, lmin, lmax):
    g = torch.Generator().manual_seed(2)
    b = 16
    tw = torch.randn(b, 4, 6, generator=g)
    tl = tw + 0.5 * torch.randn(b, 4, 6, generator=g)
    shared = torch.randn(b, 4, 6, generator=g)
    pw = shared + 0.3 * torch.randn(b, 4, 6, generator=g)
    # a spread of conflict levels: some losers' errors aligned with the winners', some opposed
    scale = torch.linspace(-2.0, 3.0, b).reshape(b, 1, 1)
    pl = tl + scale * (pw - tw) + 0.2 * torch.randn(b, 4, 6, generator=g)
    lam = sdpo_lambda(pw, tw, pl, tl, mu=mu, lambda_min=lmin, lambda_max=lmax)
    ref = _brute_force_lambda(pw, tw, pl, tl, mu, lmin, lmax)
    torch.testing.assert_close(lam, torch.tensor([r[0] for r in ref]), rtol=1e-5, atol=1e-7)
    assert not lam.requires_grad
    assert (lam <= lmax + 1e-6).all()
    for value, inner, gw2 in ref:
        assert value >= 0
        assert value * inner <= gw2 * (1 + 1e-5)  # first-order winner change is non-positive
    if mu == 3.0:  # mu > 1: the safety bound (not lambda_max) is what clips some pairs
        bound_active = [abs(v * i - g2) < 1e-6 * g2 for v, i, g2 in ref if i > 0]
        assert any(bound_active)


def test_closed_form_output_grad_equals_autograd():
    g = torch.Generator().manual_seed(3)
    p, t = torch.randn(3, 5, 7, generator=g).requires_grad_(True), torch.randn(3, 5, 7, generator=g)
    auto = torch.autograd.grad(((p - t) ** 2).flatten(1).mean(1).sum(), p)[0].flatten(1)
    torch.testing.assert_close(mse_output_grad(p, t), auto)


def test_paper_rule_closed_form():
    # one conflicting pair (g_l = 3 g_w) and one opposed pair
    tw = torch.zeros(2, 4)
    pw = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0]])
    tl = torch.zeros(2, 4)
    pl = torch.tensor([[3.0, 0, 0, 0], [-1.0, 0, 0, 0]])
    lam = sdpo_lambda(pw, tw, pl, tl, mu=0.25, lambda_min=0.0, lambda_max=1.0, rule="paper")
    # conflict: (1 - mu) |g_w|^2 / <g_w, g_l> = 0.75 * 1 / 3 (common factor (2/N)^2 cancels); opposed: lambda_max
    torch.testing.assert_close(lam, torch.tensor([0.25, 1.0]))
    with pytest.raises(ValueError, match="rule"):
        sdpo_lambda(pw, tw, pl, tl, rule="nope")


def test_loser_scale_keeps_value_and_scales_only_loser_gradient():
    g = torch.Generator().manual_seed(4)
    pw, pl, tw, tl, rw, rl = (torch.randn(4, 6, generator=g) for _ in range(6))
    lam = torch.tensor([0.0, 0.25, 0.5, 1.0])
    grads = []
    for scale in (None, lam):
        a, b = pw.clone().requires_grad_(True), pl.clone().requires_grad_(True)
        loss, _ = diffusion_dpo_loss(a, b, tw, tl, rw, rl, beta=3.0, loser_scale=scale)
        loss.backward()
        grads.append((loss.detach(), a.grad, b.grad))
    (l0, gw0, gl0), (l1, gw1, gl1) = grads
    torch.testing.assert_close(l0, l1)
    torch.testing.assert_close(gw0, gw1)
    torch.testing.assert_close(gl1, gl0 * lam[:, None])


class _SharedOutput(torch.nn.Module):
    """Tiny model whose prediction is one learned vector shared by winner and loser: its Jacobian is the
    identity, so the output-space first-order analysis is exact in parameter space."""

    def __init__(self, n: int):
        super().__init__()
        self.v = torch.nn.Parameter(torch.zeros(1, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v.expand(x.shape[0], -1)


def _winner_change_after_step(safeguard: bool, rule: str = "report", mu: float = 0.5, lr: float = 1e-3):
    torch.manual_seed(0)
    n = 8
    model = _SharedOutput(n)
    ref = _SharedOutput(n)
    e = torch.ones(1, n)
    x = torch.zeros(1, n)
    # the loser's error points the same way as the winner's and is 3x larger: plain DPO pushes the shared
    # output away from the loser target and therefore away from the winner target too
    tw, tl = 1.0 * e, 3.0 * e
    pred = model(x)
    loss, st = sdpo_loss(pred, pred, tw, tl, ref(x).detach(), ref(x).detach(), beta=10.0,
                         safeguard=SafeguardConfig(enabled=safeguard, rule=rule, mu=mu))
    grad = torch.autograd.grad(loss, model.v)[0]
    lw = lambda v: ((v - tw) ** 2).mean()  # noqa: E731
    v0 = model.v.detach().clone()
    gw_param = torch.autograd.grad(lw(model.v), model.v)[0]
    first_order = float((gw_param * (-lr * grad)).sum())
    actual = float(lw(v0 - lr * grad) - lw(v0))
    return first_order, actual, st


def test_safeguard_keeps_winner_loss_non_increasing_where_plain_dpo_raises_it():
    fo_plain, actual_plain, _ = _winner_change_after_step(safeguard=False)
    assert fo_plain > 0 and actual_plain > 0  # plain DPO hurts the winner
    for rule in ("report", "paper"):
        fo_safe, actual_safe, st = _winner_change_after_step(safeguard=True, rule=rule, mu=0.5)
        assert fo_safe < 0 and actual_safe < 0, rule  # with a margin the winner strictly improves
        assert 0 <= st["lambda_min"].item() <= st["lambda_max"].item() <= 1.0
        # at the boundary (report mu = 1 / paper mu = 0) lambda = |g_w|^2 / <g_w, g_l>: zero first-order change
        fo_edge, _, st = _winner_change_after_step(safeguard=True, rule=rule, mu=1.0 if rule == "report" else 0.0)
        assert abs(fo_edge) < 1e-12 and st["lambda_mean"].item() == pytest.approx(1 / 3, rel=1e-5)


@pytest.mark.parametrize("rule,mu", [("report", 1.0), ("report", 3.0), ("paper", 0.0)])
def test_safety_margin_clips_both_rules_with_strict_winner_decrease(rule, mu):
    g = torch.Generator().manual_seed(5)
    b, margin = 16, 0.3
    tw = torch.randn(b, 4, 6, generator=g)
    pw = tw + torch.randn(b, 4, 6, generator=g)
    tl = tw + 0.3 * torch.randn(b, 4, 6, generator=g)
    # losers' errors nearly parallel to the winners' (the text-pair case: <g_w, g_l> ~ |g_w|^2)
    pl = tl + (pw - tw) * torch.linspace(0.5, 2.0, b).reshape(b, 1, 1) + 0.05 * torch.randn(b, 4, 6, generator=g)
    lam = sdpo_lambda(pw, tw, pl, tl, mu=mu, rule=rule, safety_margin=margin)
    gw, gl = mse_output_grad(pw, tw), mse_output_grad(pl, tl)
    inner, gw2 = (gw * gl).sum(1), gw.pow(2).sum(1)
    assert (inner > 0).all()
    # the first-order winner change -eta s (|g_w|^2 - lambda <g_w, g_l>) is at most -margin * eta s |g_w|^2
    assert (lam * inner <= (1 - margin) * gw2 * (1 + 1e-5)).all()
    if rule == "report":
        ref = _brute_force_lambda(pw, tw, pl, tl, mu, 0.0, 1.0, margin=margin)
        torch.testing.assert_close(lam, torch.tensor([r[0] for r in ref]), rtol=1e-5, atol=1e-7)
    # without the margin, the report rule with mu = 1 leaves lambda ~ 1 on near-parallel pairs
    if rule == "report" and mu == 1.0:
        plain = sdpo_lambda(pw, tw, pl, tl, mu=1.0, rule="report")
        assert (lam < plain - 0.1).any() and (lam <= plain + 1e-7).all()
    with pytest.raises(ValueError, match="safety_margin"):
        sdpo_lambda(pw, tw, pl, tl, safety_margin=1.5)


def test_safety_margin_first_order_step_on_the_shared_output_model():
    # g_l = 3 g_w (the _SharedOutput setup): the bound (1 - margin) |g_w|^2 / <g_w, g_l> = (1 - margin) / 3
    for margin in (0.0, 0.25):
        torch.manual_seed(0)
        model, ref = _SharedOutput(8), _SharedOutput(8)
        e, x = torch.ones(1, 8), torch.zeros(1, 8)
        pred = model(x)
        _, st = sdpo_loss(pred, pred, 1.0 * e, 3.0 * e, ref(x).detach(), ref(x).detach(), beta=10.0,
                          safeguard=SafeguardConfig(mu=1.0, safety_margin=margin))
        assert st["lambda_mean"].item() == pytest.approx((1 - margin) / 3, rel=1e-5)
