"""Flow-GRPO with coefficients-preserving sampling (report Stage 3, Eqs. 4-6).

One training step = one GRPO iteration on a batch of prompts:
1. rollout (no grad): G images per prompt with CFG, a short stochastic schedule (`grpo.rollout.steps`,
   fewer than evaluation), CPS or Flow-GRPO SDE steps (`lit_ovis.sampling.sde`); trajectories and the old
   policy's per-step log-probs are stored. One sampling section configures it: `model.sampling` with the
   rollout's overrides (steps always; guidance scale and size only where set), see `rollout_sampling`;
2. rewards: the weighted scorer ensemble on the decoded images (`lit_ovis.scoring`), logged per scorer;
3. advantages per prompt group (Eq. 4), with rewards and group keys all-gathered so a group whose images are
   spread over ranks is normalised over all of its members (`lit_ovis.parallel.collectives`);
4. training window: the contiguous run of denoising steps to train on, fixed or adapted every iteration from
   per-step scores (`lit_ovis.losses.window.TrainingWindow`: its scores and RNG are checkpointed);
5. update (manual optimisation): for `inner_epochs` x mini-batches, every window step recomputes the policy
   log-prob of the stored transition, the clipped surrogate (Eq. 5) plus beta * KL to the frozen reference
   (the DPO model: a frozen copy of the backbone, or with LoRA the base weights with the adapter off);
   gradients accumulate over the window's steps, are clipped (the base module's clipping), and the optimizer
   steps once per mini-batch.

Config groups (`GRPOConfig`): `rollout`, `advantages`, `update`, `window`, plus `rewards`. Random streams derive
from the run seed (`seed_everything`): rollout noise per (rank, step), the update's mini-batch order per step
(the same on every rank) and the window's exploration.
`trainer.max_steps` counts optimizer steps: iterations x update.inner_epochs x update.optimizer_steps_per_epoch.
Rewards: `grpo.rewards` maps scorer names (`lit_ovis.scoring.build_scorer`) to weights; a caller may instead
set `module.reward_fns = {"name": fn}` with fn(images [N,3,H,W] in [0,1], prompts, metadata) -> [N].
"""

from __future__ import annotations

import time

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from lightning.pytorch.utilities import rank_zero_warn

from lit_ovis.errors import ConfigError
from lit_ovis.losses.grpo import (KL_SCALES, GroupStatTracker, informative_first, logp_change_signal, noise_advantage_signal,
                                  ppo_clip_loss, step_kl)
from lit_ovis.losses.window import TrainingWindow, WindowConfig
from lit_ovis.models.text_encoder import text_ids
from lit_ovis.models.vae import latent_image_ids, latent_size, unpack_latents
from lit_ovis.modules.base import OvisBaseModule
from lit_ovis.modules.config import BackboneConfig, EMAConfig, EncoderConfig, LoRAConfig, OptimizerConfig
from lit_ovis.parallel.collectives import global_group_advantages, mean_over_ranks
from lit_ovis.parallel.fsdp import ParallelConfig
from lit_ovis.render import reward_grid
from lit_ovis.sampling.generate import SamplingConfig, initial_noise, latent_channels_of
from lit_ovis.sampling.ode import sigma_schedule, uses_cfg, velocity
from lit_ovis.sampling.sde import SAMPLERS, Trajectory, sampler_step, sde_sample
from lit_ovis.seeds import mix_seed, run_seed

UPDATE_ORDER_STREAM = 1  # mix_seed index of the update's mini-batch order (rollout noise is index 0)
SELECTION_STREAM = 2  # mix_seed index of the choice among informative rollouts (update.samples)


@dataclass
class RolloutConfig:
    """How each iteration's images are sampled (on-policy, no grad)."""

    group_size: int = 16
    """G images per prompt on each rank (a prompt on several ranks forms one larger group)."""
    steps: int = 10
    """Denoising steps per rollout (fewer than model.sampling.steps, which evaluation and sample grids use)."""
    sampler: str = "cps"
    """Stochastic step: "cps" (coefficients-preserving, Wang & Yu 2025) or "sde" (Flow-GRPO)."""
    noise_level: float = 0.7
    """CPS eta in (0, 1] or the Flow-GRPO SDE's a: how much noise each step injects."""
    guidance_scale: float | None = None
    """CFG scale in rollouts and in the update's policy/reference forwards; unset: model.sampling.guidance_scale."""
    height: int | None = None
    """Rollout image height in px (multiple of 16); unset: model.sampling.height."""
    width: int | None = None
    """Rollout image width in px (multiple of 16); unset: model.sampling.width."""
    batch_size: int = 8
    """Images per rollout forward (memory bound)."""
    log_prob_reduce: str = "mean"
    """Reduction of step log-probs over latent dims: "mean" (Flow-GRPO, ratios O(1) at any size) or "sum"."""


@dataclass
class AdvantageConfig:
    """Rewards -> advantages (report Eq. 4)."""

    eps: float = 1e-4
    """Added to the reward std before dividing."""
    global_std: bool = False
    """Divide by the batch's reward std instead of each group's."""
    per_prompt_stats: bool = False
    """Baseline from a per-prompt running buffer of past rewards (GroupStatTracker) instead of the current group."""
    stat_buffer_size: int = 32
    """per_prompt_stats: rewards kept per prompt."""
    stat_min_count: int = 16
    """per_prompt_stats: rewards needed before a prompt's own statistics replace the batch's."""
    clip_max: float = 5.0
    """Advantages are clipped to [-clip_max, clip_max] in the surrogate."""


@dataclass
class UpdateConfig:
    """The policy update on the stored rollouts (manual optimisation)."""

    batch_size: int = 8
    """Samples per forward/backward in the update."""
    inner_epochs: int = 1
    """Passes over the stored rollouts per iteration."""
    optimizer_steps_per_epoch: int = 1
    """Mini-batches of an epoch accumulate into this many optimizer steps; at most the epoch's mini-batch count
    (rollouts trained per rank / batch_size): a larger value is capped there, with a warning, and the iteration
    count of trainer.max_steps follows the capped value."""
    clip_range: float = 1e-4
    """PPO clip range of the probability ratio (tiny, as Flow-GRPO: per-dimension-mean ratios move little)."""
    samples: int = 0
    """Rollouts per rank the update trains on; 0 trains on all of them. Fewer: those with a non-zero advantage
    come first (DAPO's dynamic sampling without a second rollout), so with group_size x prompts above `samples`
    the update skips groups whose images all scored the same (no policy gradient, only KL). Rollouts are cheap
    next to the update (3 s vs 9 s per iteration on the demo's task), so rolling out twice as many prompts and
    keeping half fills the update with signal; on the demo ladder that did not add held-out words
    (benchmarks/RESULTS.md)."""
    kl_beta: float = 0.04
    """Weight of the KL penalty to the frozen reference (the DPO model); 0 skips the reference forward."""
    kl_scale: str = "recipe"
    """How each denoising step's KL to the reference is scaled, i.e. what a given kl_beta means.
    "recipe" (default): as the published code computes it, so kl_beta values from Flow-GRPO / FlowCPS recipes
    port unchanged: sampler "sde" uses Flow-GRPO's ||mu - mu_ref||^2 / (2 sigma_t^2), sigma_t = a sqrt(t/(1-t))
    (the SDE's coefficient, without the step's sqrt(dt)); sampler "cps" uses FlowCPS's ||mu - mu_ref||^2 (no
    Gaussian 1/(2 std^2)); both averaged over latent dims. "exact": the true KL between the two step Gaussians,
    ||mu - mu_ref||^2 / (2 std^2) (the papers' formula; what this project used before). exact = recipe x 1/dt for
    "sde" (dt = t - t') and recipe x 1/(2 std^2) for "cps" (std = t' sin(eta pi/2)); at 10 rollout steps at 1024^2
    that is 3.9-29x (sde) and 0.67-9.3x (cps, eta 0.7) depending on the step, so no single kl_beta converts one form
    into the other: keep "recipe" to reuse a published kl_beta, "exact" to reproduce a run made with it."""
    shuffle_steps: bool = True
    """Visit the window's denoising steps in a random order per mini-batch."""


@dataclass
class GRPOConfig:
    """Flow-GRPO settings, grouped as one iteration runs: rollout, rewards, advantages, window, update."""

    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling the G images per prompt."""
    rewards: dict[str, float] = field(default_factory=lambda: {"ocr": 1.0})
    """Scorer name -> weight of the reward ensemble (`lit_ovis.scoring` registry)."""
    reward_kwargs: dict[str, dict] = field(default_factory=dict)
    """Scorer name -> constructor arguments, e.g. {clip: {model_path: ...}}; {ocr: {mode: recognize, metric:
    likelihood}} rewards the recogniser's per-character probability of the target text (dense) instead of the
    reading's word-similarity F1 (`metric: reward`, the default)."""
    advantages: AdvantageConfig = field(default_factory=AdvantageConfig)
    """Group-normalised advantages."""
    window: WindowConfig = field(default_factory=WindowConfig)
    """Which denoising steps each iteration trains on."""
    update: UpdateConfig = field(default_factory=UpdateConfig)
    """Clipped-surrogate + KL update on the stored rollouts."""
    log_images_every_n_steps: int = 50
    """TensorBoard grid of rollouts stamped with their rewards every N optimizer steps; 0 disables."""
    log_images_max: int = 16
    """Rollouts in that grid."""


def prompt_keys(prompts: list[str], device=None) -> torch.Tensor:
    """Stable int64 group keys from prompt text (equal on every rank and run, unlike hash())."""
    keys = [int.from_bytes(hashlib.blake2b(p.encode("utf-8"), digest_size=8).digest(), "little") >> 1 for p in prompts]
    return torch.tensor(keys, dtype=torch.int64, device=device)


def rollout_sampling(sampling: SamplingConfig, rollout: RolloutConfig) -> SamplingConfig:
    """The one sampling section rollouts read: model.sampling with the rollout's steps and, where set, its
    guidance scale and size (the schedule's shift settings always come from model.sampling)."""
    given = {"guidance_scale": rollout.guidance_scale, "height": rollout.height, "width": rollout.width}
    return replace(sampling, steps=rollout.steps, **{k: v for k, v in given.items() if v is not None})


class GRPOModule(OvisBaseModule):
    def __init__(
        self,
        backbone: BackboneConfig = BackboneConfig(),
        encoders: EncoderConfig = EncoderConfig(),
        optimizer: OptimizerConfig = OptimizerConfig(),
        ema: EMAConfig = EMAConfig(),
        sampling: SamplingConfig = SamplingConfig(),
        parallel: ParallelConfig = ParallelConfig(),
        grpo: GRPOConfig = GRPOConfig(),
        lora: LoRAConfig = LoRAConfig(),
    ):
        super().__init__(backbone, encoders, optimizer, ema, sampling, parallel, lora)
        self.grpo = grpo
        self.rollout_cfg = rollout_sampling(sampling, grpo.rollout)
        self._validate()
        if lora.enabled and lora.dropout > 0:
            # rollouts run in eval mode (no dropout): a dropout-perturbed update would not be on-policy (ratio != 1)
            raise ConfigError(f"--model.lora.dropout must be 0 for GRPO (got {lora.dropout}): rollouts and updates must be the same policy")
        self.automatic_optimization = False
        self.reward_fns: dict[str, Callable] | None = None  # a caller's reward functions instead of grpo.rewards
        self._reward_ensemble = None  # built on first use (scorers may load models)
        adv = grpo.advantages
        self.tracker = GroupStatTracker(adv.stat_buffer_size, adv.stat_min_count, adv.eps) if adv.per_prompt_stats else None
        self.window = TrainingWindow(grpo.window, seed=run_seed())

    def _validate(self) -> None:
        ro, upd = self.grpo.rollout, self.grpo.update
        if ro.sampler not in ("sde", "cps"):
            raise ConfigError(f"--model.grpo.rollout.sampler must be 'sde' or 'cps' (of {SAMPLERS}), got {ro.sampler!r}")
        if ro.noise_level <= 0:
            raise ConfigError("--model.grpo.rollout.noise_level must be > 0: deterministic rollouts have no log-probs to train")
        if ro.sampler == "cps" and ro.noise_level > 1:
            raise ConfigError(f"--model.grpo.rollout.noise_level is CPS's eta and must lie in (0, 1], got {ro.noise_level}")
        if ro.batch_size < 1 or upd.batch_size < 1:
            raise ConfigError("--model.grpo.rollout.batch_size and --model.grpo.update.batch_size must be >= 1")
        if upd.samples < 0:
            raise ConfigError(f"--model.grpo.update.samples must be >= 0 (0 trains on every rollout), got {upd.samples}")
        if upd.kl_scale not in KL_SCALES:
            raise ConfigError(f"--model.grpo.update.kl_scale must be one of {KL_SCALES}, got {upd.kl_scale!r}")
        if ro.group_size < 2 and not self.grpo.advantages.per_prompt_stats:
            raise ConfigError("--model.grpo.rollout.group_size must be >= 2 (or set grpo.advantages.per_prompt_stats) for group advantages")
        size = self.rollout_cfg
        if (size.height % 16) or (size.width % 16):
            raise ConfigError(f"--model.grpo.rollout.height/width must be multiples of 16, got {size.height}x{size.width}")

    @property
    def step_scores(self) -> torch.Tensor | None:
        """The adaptive window's per-step scores."""
        return self.window.scores

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        # the adaptive window's step scores and the exploration RNG continue across a resume
        checkpoint["grpo_state"] = {**self.window.state_dict(),
                                    "tracker": {k: list(v) for k, v in self.tracker.history.items()} if self.tracker else None}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("grpo_state")
        if not state:
            return
        self.window.load_state_dict(state)
        if self.tracker is not None and state.get("tracker"):
            for k, v in state["tracker"].items():
                self.tracker.history[k].extend(v)

    # ------------------------------------------------------------------------------------ models
    def needs_reference(self) -> bool:
        return self.grpo.update.kl_beta > 0  # the KL term's frozen DPO model; 0 skips the reference forward

    def reference_velocity(self, x, sigma, embeds, txt, img, negative) -> torch.Tensor:
        with self.reference_model() as reference:
            return velocity(reference, x, sigma, embeds, txt, img, negative, guidance_scale=self.rollout_cfg.guidance_scale)

    def build_rewards(self):
        """The weighted reward ensemble (`lit_ovis.scoring.ScorerEnsemble`): `grpo.rewards` {name: weight} from the
        scorer registry with `grpo.reward_kwargs`, or the caller's `reward_fns` {name: fn}."""
        if self._reward_ensemble is None:
            from lit_ovis.scoring.ensemble import build_ensemble

            self._reward_ensemble = build_ensemble(self.grpo.rewards, self.grpo.reward_kwargs, weights_option="--model.grpo.rewards",
                                                   kwargs_option="--model.grpo.reward_kwargs", scorers=self.reward_fns)
        return self._reward_ensemble

    # ------------------------------------------------------------------------------------ rollout
    @torch.no_grad()
    def rollout(self, prompts: list[str]) -> dict[str, Any]:
        """G stochastic rollouts per prompt; returns the trajectory, conditioning and decoded images."""
        ro, s = self.grpo.rollout, self.rollout_cfg
        self.place_frozen()
        prompts_rep = [p for p in prompts for _ in range(ro.group_size)]
        n = len(prompts_rep)
        embeds = self.text_encoder.encode(prompts).to(self.device, self.compute_dtype)
        embeds = embeds.repeat_interleave(ro.group_size, 0)
        negative = self.empty_embed.expand(n, -1, -1) if uses_cfg(s.guidance_scale) else None
        scale = self.vae.scale_factor
        lh, lw = latent_size(s.height, s.width, scale)
        img = latent_image_ids(lh, lw, device=self.device, dtype=embeds.dtype)
        txt = text_ids(embeds.shape[1], device=self.device, dtype=embeds.dtype)
        gen = torch.Generator(device=self.device).manual_seed(mix_seed(run_seed(), self.global_rank, self.global_step))
        noise = initial_noise(n, s.height, s.width, gen, device=self.device, dtype=embeds.dtype,
                              channels=latent_channels_of(self.backbone), scale=scale)
        sigmas = sigma_schedule(s.steps, noise.shape[1], s.base_seq_len, s.max_seq_len, s.base_shift, s.max_shift)
        was_training = self.backbone.training
        self.backbone.eval()
        parts = []
        try:
            for i in range(0, n, ro.batch_size):
                sl = slice(i, i + ro.batch_size)
                parts.append(sde_sample(
                    self.backbone, noise[sl], embeds[sl], txt, img, sigmas, ro.sampler, ro.noise_level,
                    None if negative is None else negative[sl], s.guidance_scale, gen, ro.log_prob_reduce,
                ))
        finally:
            self.backbone.train(was_training)
        traj = Trajectory(
            torch.cat([p.latents for p in parts]), torch.cat([p.log_probs for p in parts]),
            torch.cat([p.noise for p in parts]), parts[0].std, parts[0].sigmas,
        )
        final = unpack_latents(traj.latents[:, -1], lh, lw)
        vae_dtype = next(self.vae.parameters()).dtype
        images = (self.vae.decode(final.to(vae_dtype)).float() / 2 + 0.5).clamp(0, 1)
        return dict(traj=traj, prompts=prompts_rep, embeds=embeds, negative=negative, txt=txt, img=img,
                    images=images, n_prompts=len(prompts))

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> tuple[torch.Tensor, dict]:
        """Weighted reward ensemble [N] and each scorer's raw scores."""
        total, per = self.build_rewards()(images, prompts, metadata)
        return total.to(self.device), {k: v.to(self.device) for k, v in per.items()}

    # ------------------------------------------------------------------------------------ window
    def choose_window(self, traj: Trajectory, adv: torch.Tensor, keys: torch.Tensor) -> tuple[int, int]:
        if self.window.scores_noise:  # every step scored from the stored noise; identical on every rank
            self.window.observe(mean_over_ranks(noise_advantage_signal(traj.noise, adv, keys)))
        iteration = self.global_step // self._opt_steps_per_iter(adv.shape[0])
        return self.window.choose(traj.std > 0, iteration)

    # ------------------------------------------------------------------------------------ update
    def step_log_prob(self, model_v: torch.Tensor, x, x_next, sigma, sigma_next):
        ro = self.grpo.rollout
        return sampler_step(ro.sampler, x, model_v, sigma, sigma_next, noise_level=ro.noise_level,
                            prev_sample=x_next, reduce=ro.log_prob_reduce)

    def training_step(self, batch: dict[str, Any], batch_idx: int):
        cfg = self.grpo
        opt = self.optimizers()
        sched = self.lr_schedulers()
        prompts = list(batch["prompts"])
        targets = list(batch.get("target_texts", [""] * len(prompts)))
        langs = list(batch.get("languages", [""] * len(prompts)))

        started = time.perf_counter()
        ro = self.rollout(prompts)
        traj: Trajectory = ro["traj"]
        n = traj.latents.shape[0]
        metadata = [{"target_text": t, "language": l} for t, l in zip(targets, langs) for _ in range(cfg.rollout.group_size)]
        scoring = time.perf_counter()  # the scorers read images on the host: the rollout has finished by now
        reward, per_scorer = self.score(ro["images"], ro["prompts"], metadata)
        scored = time.perf_counter()
        keys = prompt_keys(ro["prompts"], device=self.device)
        adv = global_group_advantages(reward, keys, cfg.advantages.eps, cfg.advantages.global_std, self.tracker).to(self.device)
        start, end = self.choose_window(traj, adv, keys)
        window = list(range(start, end))
        trained = self._trained_rollouts(adv)

        stats = self._update(ro, traj, adv, window, opt, sched, trained)
        done = time.perf_counter()

        log = {"reward/mean": reward.mean(), "reward/std": reward.std(unbiased=False)}
        for name, r in per_scorer.items():
            log[f"reward/{name}_mean"], log[f"reward/{name}_std"] = r.mean(), r.std(unbiased=False)
        log.update({"adv/mean": adv.mean(), "adv/std": adv.std(unbiased=False), "adv/abs_max": adv.abs().max(),
                    # share of rollouts with a training signal, rolled out and trained on
                    "adv/informative_frac": (adv != 0).float().mean(),
                    "adv/trained_informative_frac": (adv[trained] != 0).float().mean(),
                    "window/start": float(start), "window/end": float(end),
                    # wall time of the iteration's parts (host clock; on a GPU the update's tail may still be queued)
                    "time/rollout_s": scoring - started, "time/reward_s": scored - scoring, "time/update_s": done - scored,
                    "time/reward_share": (scored - scoring) / max(done - started, 1e-9),
                    "time/reward_images_per_s": n / max(scored - scoring, 1e-9)})
        log.update(stats)
        self.log_dict(log, on_step=True, prog_bar=False, batch_size=n)
        self.log("train/reward", reward.mean(), on_step=True, batch_size=n)  # shown by callbacks.progress
        if self.step_scores is not None and cfg.window.mode == "adaptive":
            self.log_dict({f"window/score_{k}": float(v) for k, v in enumerate(self.step_scores)}, on_step=True, batch_size=n)
        self._log_images(ro["images"], reward)
        return None

    def _trained_rollouts(self, adv: torch.Tensor) -> torch.Tensor:
        """Indices of the rollouts the update trains on (`update.samples`; all of them when 0)."""
        n = adv.shape[0]
        keep = self._trained_count(n)
        if keep == n:
            return torch.arange(n, device=adv.device)
        gen = torch.Generator().manual_seed(mix_seed(run_seed(), self.global_rank, self.global_step, SELECTION_STREAM))
        return informative_first(adv, keep, gen).to(adv.device)

    def _trained_count(self, n: int) -> int:
        """How many of n rollouts per rank the update trains on."""
        return min(n, self.grpo.update.samples) if self.grpo.update.samples else n

    def _update(self, ro, traj: Trajectory, adv, window, opt, sched, trained: torch.Tensor) -> dict[str, torch.Tensor]:
        upd = self.grpo.update
        n = trained.numel()
        sigmas = traj.sigmas
        # the same permutation on every rank
        gen = torch.Generator().manual_seed(mix_seed(run_seed(), step=self.global_step, index=UPDATE_ORDER_STREAM))
        acc: dict[str, list[torch.Tensor]] = {}
        logp_change = torch.zeros(traj.log_probs.shape[1])
        logp_count = torch.zeros_like(logp_change)
        n_mb, accumulate = self._mini_batches(n)
        guidance = self.rollout_cfg.guidance_scale
        for _ in range(upd.inner_epochs):
            perm = torch.randperm(n, generator=gen)
            for mb, b in enumerate(range(0, n, upd.batch_size)):
                idx = trained[perm[b: b + upd.batch_size].to(self.device)]
                steps = list(window)
                if upd.shuffle_steps:
                    steps = [steps[i] for i in torch.randperm(len(steps), generator=gen).tolist()]
                neg = None if ro["negative"] is None else ro["negative"][idx]
                for k in steps:
                    x, x_next = traj.latents[idx, k], traj.latents[idx, k + 1]
                    v = velocity(self.backbone, x, sigmas[k], ro["embeds"][idx], ro["txt"], ro["img"], neg, guidance_scale=guidance)
                    out = self.step_log_prob(v, x, x_next, sigmas[k], sigmas[k + 1])
                    loss, st = ppo_clip_loss(out.log_prob, traj.log_probs[idx, k], adv[idx], upd.clip_range,
                                             self.grpo.advantages.clip_max)
                    st["policy_loss"] = loss.detach()
                    if upd.kl_beta > 0:
                        with torch.no_grad():
                            v_ref = self.reference_velocity(x, sigmas[k], ro["embeds"][idx], ro["txt"], ro["img"], neg)
                            ref_mean = self.step_log_prob(v_ref, x, x_next, sigmas[k], sigmas[k + 1]).mean
                        kl = step_kl(out.mean, ref_mean, out.std, sigmas[k] - sigmas[k + 1], self.grpo.rollout.sampler,
                                     upd.kl_scale, self.grpo.rollout.log_prob_reduce).mean()
                        loss = loss + upd.kl_beta * kl
                        st["kl"] = kl.detach()
                    st["loss"] = loss.detach()
                    in_group = min(accumulate, n_mb - (mb // accumulate) * accumulate)
                    self.manual_backward(loss / (len(steps) * in_group))
                    logp_change[k] += float(logp_change_signal(out.log_prob, traj.log_probs[idx, k], adv[idx]))
                    logp_count[k] += 1
                    for key, val in st.items():
                        acc.setdefault(key, []).append(val.detach().float())
                if (mb + 1) % accumulate == 0 or mb == n_mb - 1:
                    self._clip_and_step(opt, sched, acc)
        if self.window.scores_updates:  # scores of the trained steps only, averaged over ranks
            seen = logp_count > 0
            sig = torch.where(seen, logp_change / logp_count.clamp_min(1), torch.zeros_like(logp_change))
            self.window.observe(mean_over_ranks(sig, self.device), seen)
        out = {f"train/{k}": torch.stack(v).mean() for k, v in acc.items() if k not in ("ratio_min", "ratio_max")}
        if "ratio_min" in acc:
            out["train/ratio_min"] = torch.stack(acc["ratio_min"]).min()
            out["train/ratio_max"] = torch.stack(acc["ratio_max"]).max()
        return out

    def _clip_and_step(self, opt, sched, acc) -> None:
        norm = self.clip_grad_norm()
        if norm is not None:
            acc.setdefault("grad_norm", []).append(norm.detach().float())
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sched is not None:
            sched.step()

    def _log_images(self, images: torch.Tensor, rewards: torch.Tensor) -> None:
        every = self.grpo.log_images_every_n_steps
        if not every or self.global_rank != 0 or self.logger is None:
            return
        # global_step has advanced during the update: log on the iteration that crossed a multiple of `every`
        if (self.global_step // every) == ((self.global_step - self._opt_steps_per_iter(images.shape[0])) // every):
            return
        experiment = getattr(self.logger, "experiment", None)
        if not hasattr(experiment, "add_image"):
            return
        m = min(self.grpo.log_images_max, images.shape[0])
        experiment.add_image("rollouts", reward_grid(images[:m], rewards[:m], nrow=self.grpo.rollout.group_size), self.global_step)

    def _mini_batches(self, trained: int) -> tuple[int, int]:
        """(mini-batches per epoch, mini-batches accumulated per optimizer step) for `trained` rollouts per rank."""
        upd = self.grpo.update
        n_mb = -(-trained // upd.batch_size)
        if upd.optimizer_steps_per_epoch > n_mb:
            rank_zero_warn(f"--model.grpo.update.optimizer_steps_per_epoch={upd.optimizer_steps_per_epoch} is more than the "
                           f"{n_mb} mini-batches of {upd.batch_size} rollouts an epoch has: {n_mb} steps per epoch are taken, so "
                           "trainer.max_steps covers more iterations than the setting suggests")
        return n_mb, -(-n_mb // max(1, min(upd.optimizer_steps_per_epoch, n_mb)))

    def _opt_steps_per_iter(self, n: int) -> int:
        """Optimizer steps of one iteration with n rollouts per rank."""
        n_mb, accumulate = self._mini_batches(self._trained_count(n))
        return self.grpo.update.inner_epochs * -(-n_mb // accumulate)
