"""Diffusion-DPO on flow-matching reconstruction losses, with the Diffusion-SDPO winner-preserving safeguard.

Report Stage 2, Eqs. 1-3. Pure functions: tensors in, tensors out.

Diffusion-DPO (Wallace et al. 2023, arXiv:2311.12908) replaces the intractable log-likelihood ratio
log p_theta(x) / p_ref(x) of Eq. 1 by the difference of per-timestep reconstruction errors along a shared
forward-noised sample. For velocity prediction (x_t = (1 - t) x0 + t eps, target v = eps - x0), with the
*same* noise and timestep for winner and loser:

    L^k_theta = mean_elements(|v_theta(x^k_t, t, c) - v^k|^2),  k in {w, l}   (per sample, fp32)
    L^k_ref   = the same with the frozen reference model (no grad)
    z         = -(beta / 2) * w(t) * [(L^w_theta - L^w_ref) - (L^l_theta - L^l_ref)]
    loss      = -log sigmoid(z)  (mean over pairs)

T-scaling convention: Wallace et al. write beta * T * omega(lambda_t) with a sum-reduced squared error; here
the per-element *mean* is used and T, the Gaussian 1/(2 sigma^2) and the element count are folded into beta,
as the public Diffusion-DPO / Diffusion-SDPO training scripts do (beta_dpo = 5000 for SD1.5 and SDXL there).
Hence `beta` is "large" (thousands). w(t) is an optional per-pair timestep weight (default 1).

Implicit reward of a sample: r^k = -(beta / 2) w(t) (L^k_theta - L^k_ref); z = r^w - r^l is the reward margin,
and the implicit accuracy is the fraction of pairs with z > 0 (ties count 1/2, so policy == reference gives
exactly 0.5 and loss log 2).

Diffusion-SDPO (Fu et al. 2025, arXiv:2511.03317) safeguard. The Diffusion-DPO gradient of one pair is

    grad = (beta / 2) w sigmoid(-z) * (dL^w_theta - lambda * dL^l_theta),   lambda = 1 in plain DPO,

so a gradient step d theta = -eta * grad changes the winner loss, to first order, by

    dL^w = -eta * s * (|g^w|^2 - lambda <g^w, g^l>),        s = (beta / 2) w sigmoid(-z) >= 0.

The paper's output-space approximation replaces parameter gradients by gradients w.r.t. the model outputs
(winner and loser share prompt, noise and timestep, so the network Jacobians are treated as equal); for the
per-element MSE these are closed form: g = dL/dv_hat = 2 (v_hat - v) / N. The winner loss is non-increasing
to first order iff lambda * <g^w, g^l> <= |g^w|^2. Hence the clipping interval, per pair:

    lambda_min_eff = max(lambda_min, 0)           -- never turn the loser push into a pull
    lambda_max_eff = min(lambda_max, |g^w|^2 / <g^w, g^l>)   when <g^w, g^l> > 0 (the branches conflict)
                   = lambda_max                               otherwise (any lambda >= 0 is safe)

and the safety bound wins over `lambda_min` when the two disagree. `safety_margin` m in [0, 1] tightens the
upper end for both rules to (1 - m) |g^w|^2 / <g^w, g^l>, i.e. it demands a first-order winner *decrease* of at
least m * eta * s * |g^w|^2 instead of merely "no increase". Two proposal rules are offered, both then clipped
to that interval and detached (lambda only rescales the loser's gradient, never the loss value):

- `rule="report"` (Ovis-Image report Eq. 3, formula unchanged): lambda = mu <g^w, g^l> / (|g^l|^2 + eps). By
  Cauchy-Schwarz, mu <g^w,g^l>^2 / |g^l|^2 <= mu |g^w|^2, so for mu <= 1 the proposal already satisfies the
  bound whenever it is positive; the clip matters for mu > 1, a safety margin and lambda_min / lambda_max. With
  this rule a non-conflicting pair (<g^w, g^l> <= 0) gets lambda = lambda_min (0 by default): its update then
  only lowers the winner's error relative to the reference.
- `rule="paper"` (the Diffusion-SDPO release): demand a margin, dL^w <= -eta s mu |g^w|^2 with mu in [0, 1],
  giving the closed form lambda = (1 - mu) |g^w|^2 / <g^w, g^l> when the branches conflict and lambda_max
  (default 1 = plain DPO) otherwise. Its training scripts use mu = 0.9 (SD1.5) and 0.6 (SDXL).

Why configs/dpo.yaml uses the report rule with mu = 0.5 (benchmarks/bench_dpo_curve.py, results_dpo.md): on
rendered-text pairs the winner and the loser differ only in the text, so v_hat^w ~ v_hat^l and the targets are
close; the output-space gradients are nearly parallel and both Eq. 3 with mu = 1 and the safety bound come out
~1. The output-space argument assumes equal network Jacobians for the two branches; it is exactly the
difference between them that plain DPO exploits, so lambda ~ 1 is no protection. On the tiny model (SFT
reference, 32 pairs, 200 steps, beta 200; reference winner error 0.26 on held-out pairs) the held-out winner
error changed by: plain DPO +15.5; report mu = 1 +0.044 (lambda mean 0.81); report mu = 1 with safety margin 0.3
+0.033; paper mu = 0.6 +0.007; report mu = 0.5 -0.001 (trained pairs -0.010), at a training implicit accuracy
of 0.78 against 0.89 for mu = 1. Held-out accuracy stayed near 0.5 for every variant (no generalisation at that
scale). mu = 0.5 is the only setting that kept the winner at or below the reference on both trained and held-out pairs.

The public release computes one lambda for the whole batch; we compute it per pair, which is the same first-order
argument applied to each pair's own outputs (the pairs' outputs are disjoint, so the per-pair guarantees add).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lit_ovis.errors import ConfigError
from lit_ovis.flow import per_sample_mse

SAFEGUARD_RULES = ("report", "paper")


@dataclass
class SafeguardConfig:
    """The Diffusion-SDPO winner-preserving safeguard: how lambda_safe scales the loser branch's gradient."""

    enabled: bool = True
    """Scale the loser branch by lambda_safe (Diffusion-SDPO); false = plain Diffusion-DPO."""
    rule: str = "report"
    """"report" (Ovis-Image Eq. 3) or "paper" (the Diffusion-SDPO release's closed form)."""
    mu: float = 1.0
    """"report": strength of the loser branch (>= 0); "paper": the required safety margin in [0, 1]."""
    lambda_min: float = 0.0
    """Lower clip of lambda (the safety bound wins when they disagree)."""
    lambda_max: float = 1.0
    """Upper clip of lambda (1 = plain DPO's loser weight)."""
    safety_margin: float = 0.0
    """Both rules: clip so lambda <g_w, g_l> <= (1 - margin) |g_w|^2, demanding a first-order winner decrease."""
    eps: float = 1e-12
    """Added to |g_l|^2 in the report rule's denominator."""

    def check(self, option: str = "--model.sdpo.safeguard") -> None:
        if self.rule not in SAFEGUARD_RULES:
            raise ConfigError(f"{option}.rule must be one of {SAFEGUARD_RULES}, got {self.rule!r}")
        if self.rule == "paper" and not 0.0 <= self.mu <= 1.0:
            raise ConfigError(f"{option}.mu must be in [0, 1] with rule 'paper' (a safety margin), got {self.mu}")
        if self.mu < 0:
            raise ConfigError(f"{option}.mu must be >= 0, got {self.mu}")
        if not 0.0 <= self.safety_margin <= 1.0:
            raise ConfigError(f"{option}.safety_margin must be in [0, 1], got {self.safety_margin}")
        if not 0.0 <= self.lambda_min <= self.lambda_max:
            raise ConfigError(f"{option}.lambda_min/lambda_max need 0 <= min <= max, got {self.lambda_min}, {self.lambda_max}")


def mse_output_grad(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """d per_sample_mse / d pred, closed form 2 (pred - target) / N per sample, fp32, flattened [B, N]."""
    diff = (pred.detach().float() - target.detach().float()).flatten(1)
    return 2.0 * diff / diff.shape[1]


def safe_lambda_bounds(
    gw_sq: torch.Tensor, inner: torch.Tensor, lambda_min: float = 0.0, lambda_max: float = 1.0,
    safety_margin: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair [low, high] for lambda such that lambda <g^w,g^l> <= (1 - safety_margin) |g^w|^2, i.e. the
    winner loss falls to first order by at least safety_margin times its own gradient step."""
    if lambda_max < 0:
        raise ValueError(f"safeguard lambda_max must be >= 0, got {lambda_max}")
    if not 0.0 <= safety_margin <= 1.0:
        raise ValueError(f"safeguard safety_margin must be in [0, 1], got {safety_margin}")
    high = torch.full_like(inner, float(lambda_max))
    conflict = inner > 0
    bound = (1.0 - safety_margin) * gw_sq / torch.where(conflict, inner, torch.ones_like(inner))
    high = torch.where(conflict, torch.minimum(high, bound), high)
    low = torch.minimum(torch.full_like(inner, max(float(lambda_min), 0.0)), high)
    return low, high


def sdpo_lambda(
    pred_w: torch.Tensor,
    target_w: torch.Tensor,
    pred_l: torch.Tensor,
    target_l: torch.Tensor,
    mu: float = 1.0,
    lambda_min: float = 0.0,
    lambda_max: float = 1.0,
    eps: float = 1e-12,
    rule: str = "report",
    safety_margin: float = 0.0,
) -> torch.Tensor:
    """Diffusion-SDPO loser scale lambda_safe per pair [B] (detached, fp32), from output-space gradients."""
    if rule not in SAFEGUARD_RULES:
        raise ValueError(f"unknown SDPO safeguard rule '{rule}': use one of {SAFEGUARD_RULES}")
    if rule == "paper" and not 0.0 <= mu <= 1.0:
        raise ValueError(f"SDPO rule 'paper' needs mu in [0, 1] (a safety margin), got {mu}")
    gw = mse_output_grad(pred_w, target_w)
    gl = mse_output_grad(pred_l, target_l)
    inner = (gw * gl).sum(dim=1)
    gw_sq = gw.pow(2).sum(dim=1)
    if rule == "report":
        proposal = mu * inner / (gl.pow(2).sum(dim=1) + eps)
    else:
        conflict = inner > 0
        proposal = torch.where(
            conflict, (1.0 - mu) * gw_sq / torch.where(conflict, inner, torch.ones_like(inner)),
            torch.full_like(inner, float(lambda_max)),
        )
    low, high = safe_lambda_bounds(gw_sq, inner, lambda_min, lambda_max, safety_margin)
    return torch.maximum(torch.minimum(proposal, high), low).detach()


def scale_gradient(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Same value as x, gradient multiplied by `scale` (broadcast per sample)."""
    return x.detach() + scale.to(x.dtype) * (x - x.detach())


def diffusion_dpo_loss(
    pred_w: torch.Tensor,
    pred_l: torch.Tensor,
    target_w: torch.Tensor,
    target_l: torch.Tensor,
    ref_pred_w: torch.Tensor,
    ref_pred_l: torch.Tensor,
    beta: float,
    weights: torch.Tensor | None = None,
    loser_scale: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DPO loss for velocity predictions (see module docstring). Returns (loss, stats).

    pred_*: policy velocities [B, ...]; ref_pred_*: reference velocities (treated as constants);
    target_*: velocity targets for the same noise and timestep; weights: per-pair w(t) [B];
    loser_scale: SDPO lambda [B] or scalar scaling only the gradient of the loser branch.
    """
    if pred_w.shape != pred_l.shape or target_w.shape != pred_w.shape or target_l.shape != pred_l.shape:
        raise ValueError(f"winner/loser predictions and targets must share a shape, got {tuple(pred_w.shape)}, "
                         f"{tuple(pred_l.shape)}, {tuple(target_w.shape)}, {tuple(target_l.shape)}")
    loss_w = per_sample_mse(pred_w, target_w)
    loss_l = per_sample_mse(pred_l, target_l)
    with torch.no_grad():
        ref_w = per_sample_mse(ref_pred_w.detach(), target_w)
        ref_l = per_sample_mse(ref_pred_l.detach(), target_l)
    loss_l_for_grad = loss_l if loser_scale is None else scale_gradient(
        loss_l, torch.as_tensor(loser_scale, device=loss_l.device, dtype=torch.float32))
    w = torch.ones_like(loss_w) if weights is None else weights.to(loss_w.device, torch.float32).reshape(-1)
    z = -0.5 * beta * w * ((loss_w - ref_w) - (loss_l_for_grad - ref_l))
    loss = -F.logsigmoid(z).mean()
    with torch.no_grad():
        zd = z.detach()
        stats = {
            "implicit_acc": ((zd > 0).float() + 0.5 * (zd == 0).float()).mean(),
            "reward_margin": zd.mean(),
            "reward_w": (-0.5 * beta * w * (loss_w - ref_w)).detach().mean(),
            "reward_l": (-0.5 * beta * w * (loss_l - ref_l)).detach().mean(),
            "policy_loss_w": loss_w.detach().mean(),
            "policy_loss_l": loss_l.detach().mean(),
            "ref_loss_w": ref_w.mean(),
            "ref_loss_l": ref_l.mean(),
            "dpo_loss": loss.detach(),
        }
    return loss, stats


def sdpo_loss(
    pred_w: torch.Tensor,
    pred_l: torch.Tensor,
    target_w: torch.Tensor,
    target_l: torch.Tensor,
    ref_pred_w: torch.Tensor,
    ref_pred_l: torch.Tensor,
    beta: float,
    weights: torch.Tensor | None = None,
    safeguard: SafeguardConfig | None = SafeguardConfig(),
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DPO with the Diffusion-SDPO loser scale (`safeguard`, enabled) or without it (None or disabled);
    stats add lambda_*."""
    lam = None
    if safeguard is not None and safeguard.enabled:
        lam = sdpo_lambda(pred_w, target_w, pred_l, target_l, safeguard.mu, safeguard.lambda_min, safeguard.lambda_max,
                          safeguard.eps, safeguard.rule, safeguard.safety_margin)
    loss, stats = diffusion_dpo_loss(pred_w, pred_l, target_w, target_l, ref_pred_w, ref_pred_l, beta, weights, lam)
    if lam is not None:
        stats.update(lambda_mean=lam.mean(), lambda_min=lam.min(), lambda_max=lam.max(),
                     lambda_frac_below_1=(lam < 1.0 - 1e-6).float().mean())
    return loss, stats
