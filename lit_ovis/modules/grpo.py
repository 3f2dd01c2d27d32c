"""Flow-GRPO with coefficients-preserving sampling (report Stage 3, Eqs. 4-6).

One training step = one GRPO iteration on a batch of prompts:
1. rollout (no grad): G images per prompt with CFG, a short stochastic schedule (`grpo.rollout_steps`,
   fewer than evaluation), CPS or Flow-GRPO SDE steps (`lit_ovis.sampling.sde`); trajectories and the old
   policy's per-step log-probs are stored;
2. rewards: the weighted scorer ensemble on the decoded images (`lit_ovis.scoring`), logged per scorer;
3. advantages per prompt group (Eq. 4), with rewards and group keys all-gathered so a group whose images are
   spread over ranks is normalised over all of its members;
4. training window: the contiguous run of denoising steps to train on, fixed or adapted every iteration from
   per-step scores (`lit_ovis.losses.grpo`);
5. update (manual optimisation): for `inner_epochs` x mini-batches, every window step recomputes the policy
   log-prob of the stored transition, the clipped surrogate (Eq. 5) plus beta * KL to the frozen reference
   (the DPO model: a frozen copy of the backbone, or with LoRA the base weights with the adapter off);
   gradients accumulate over the window's steps, are clipped, and the optimizer steps once per mini-batch.

`trainer.max_steps` counts optimizer steps: iterations x inner_epochs x optimizer_steps_per_epoch.
Rewards: `grpo.rewards` maps scorer names (`lit_ovis.scoring.build_scorer`) to weights; a caller may instead
set `module.reward_fns = {"name": fn}` with fn(images [N,3,H,W] in [0,1], prompts, metadata) -> [N].
"""

from __future__ import annotations

import copy
import hashlib
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

from lit_ovis.errors import ConfigError
from lit_ovis.losses.grpo import (
    GroupStatTracker, fixed_window, gaussian_step_kl, group_advantages, logp_change_signal,
    noise_advantage_signal, ppo_clip_loss, select_window, sliding_window_start, update_step_scores,
)
from lit_ovis.models.text_encoder import text_ids
from lit_ovis.models.vae import latent_image_ids, latent_size, unpack_latents
from lit_ovis.modules.base import OvisBaseModule
from lit_ovis.modules.config import BackboneConfig, EMAConfig, EncoderConfig, OptimizerConfig
from lit_ovis.parallel.fsdp import ParallelConfig
from lit_ovis.sampling.generate import SamplingConfig, initial_noise
from lit_ovis.sampling.ode import sigma_schedule, velocity
from lit_ovis.sampling.sde import SAMPLERS, Trajectory, sampler_step, sde_sample


@dataclass
class LoRASettings:
    enabled: bool = False  # train a LoRA adapter instead of all weights; the reference is the adapter-off base
    rank: int = 64
    alpha: int = 128
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj",
                                                               "add_k_proj", "add_v_proj", "to_add_out"])


@dataclass
class GRPOConfig:
    group_size: int = 16  # G images per prompt on each rank (a prompt on several ranks forms one larger group)
    rollout_steps: int = 10  # denoising steps per rollout (evaluation uses sampling.steps)
    sampler: str = "cps"  # "cps" (Wang & Yu 2025) | "sde" (Flow-GRPO) — see lit_ovis.sampling.sde
    noise_level: float = 0.7  # CPS eta in [0, 1] / Flow-GRPO a
    guidance_scale: float = 5.0  # CFG inside rollouts and in the update's policy/reference forwards
    height: int = 512
    width: int = 512
    rollout_batch_size: int = 8  # images per rollout forward (memory bound)
    train_batch_size: int = 8  # samples per forward/backward in the update
    inner_epochs: int = 1  # passes over the stored rollouts per iteration
    optimizer_steps_per_epoch: int = 1  # mini-batches of an epoch accumulate into this many optimizer steps
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    adv_eps: float = 1e-4
    global_std: bool = False  # divide by the batch's reward std instead of each group's
    per_prompt_stats: bool = False  # baseline from a per-prompt running buffer (GroupStatTracker)
    stat_buffer_size: int = 32
    stat_min_count: int = 16
    kl_beta: float = 0.04  # KL penalty to the reference (DPO) model; 0 skips the reference forward
    log_prob_reduce: str = "mean"  # "mean" (Flow-GRPO) | "sum" over latent dims
    window: str = "adaptive"  # "adaptive" | "sliding" (scheduled, noisy -> clean) | "fixed" | "all"
    window_size: int = 4  # steps trained per iteration
    window_start: int = 0  # for window="fixed"
    window_shift_every: int = 25  # window="sliding": iterations before the window moves `window_stride` steps
    window_stride: int = 1
    window_signal: str = "noise"  # "noise": noise_advantage_signal on all steps | "logp_change": on trained steps
    window_ema: float = 0.9
    window_explore: float = 0.1  # "logp_change" only: chance of a random window so untrained steps get scored
    shuffle_window_steps: bool = True
    rewards: dict[str, float] = field(default_factory=lambda: {"ocr": 1.0})
    reward_kwargs: dict[str, dict] = field(default_factory=dict)
    log_images_every_n_steps: int = 50  # TensorBoard rollout grid with rewards; 0 disables
    log_images_max: int = 16
    seed: int = 0


def prompt_keys(prompts: list[str], device=None) -> torch.Tensor:
    """Stable int64 group keys from prompt text (equal on every rank and run, unlike hash())."""
    keys = [int.from_bytes(hashlib.blake2b(p.encode("utf-8"), digest_size=8).digest(), "little") >> 1 for p in prompts]
    return torch.tensor(keys, dtype=torch.int64, device=device)


def all_gather_varlen(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate a [N, ...] tensor from every rank (N may differ); returns it and this rank's offset."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.int64)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = torch.zeros((max(sizes),) + x.shape[1:], dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]), sum(sizes[:rank])


def global_group_advantages(
    rewards: torch.Tensor, keys: torch.Tensor, eps: float = 1e-4, global_std: bool = False,
    tracker: GroupStatTracker | None = None,
) -> torch.Tensor:
    """This rank's advantages, with group statistics over all ranks' members of each group."""
    all_r, offset = all_gather_varlen(rewards.float())
    all_k, _ = all_gather_varlen(keys)
    if tracker is not None:  # every rank updates an identical tracker with identical data
        adv = tracker.update([str(int(k)) for k in all_k.tolist()], all_r)
    else:
        adv = group_advantages(all_r, all_k, eps=eps, global_std=global_std)
    return adv[offset: offset + rewards.shape[0]]


def reward_grid(images: torch.Tensor, rewards: torch.Tensor, nrow: int = 4) -> torch.Tensor:
    """[3, H', W'] grid of images in [0, 1], each stamped with its reward (for TensorBoard)."""
    import numpy as np
    from PIL import Image, ImageDraw

    n, _, h, w = images.shape
    ncol = min(nrow, n)
    rows = (n + ncol - 1) // ncol
    grid = torch.ones(3, rows * (h + 2), ncol * (w + 2))
    for i in range(n):
        arr = (images[i].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8)
        pil = Image.fromarray(arr)
        draw = ImageDraw.Draw(pil)
        draw.rectangle([0, 0, min(w, 40), 10], fill=(0, 0, 0))
        draw.text((1, -1), f"{float(rewards[i]):.3g}", fill=(255, 255, 0))
        img = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255
        r, c = divmod(i, ncol)
        grid[:, r * (h + 2): r * (h + 2) + h, c * (w + 2): c * (w + 2) + w] = img
    return grid


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
        lora: LoRASettings = LoRASettings(),
    ):
        super().__init__(backbone, encoders, optimizer, ema, sampling, parallel)
        self._validate(grpo)
        if lora.enabled and lora.dropout > 0:
            # rollouts run in eval mode (no dropout): a dropout-perturbed update would not be on-policy (ratio != 1)
            raise ConfigError(f"lora.dropout must be 0 for GRPO (got {lora.dropout}): rollouts and updates must be the same policy")
        self.grpo = grpo
        self.lora_cfg = lora
        self.automatic_optimization = False
        self.reward_fns: dict[str, Callable] | None = None  # a caller's reward functions instead of grpo.rewards
        self._reward_ensemble = None  # built on first use (scorers may load models)
        self.tracker = GroupStatTracker(grpo.stat_buffer_size, grpo.stat_min_count, grpo.adv_eps) if grpo.per_prompt_stats else None
        self.step_scores: torch.Tensor | None = None
        self._rng = random.Random(grpo.seed)

    @staticmethod
    def _validate(cfg: GRPOConfig) -> None:
        if cfg.sampler not in ("sde", "cps"):
            raise ConfigError(f"grpo.sampler must be 'sde' or 'cps' (of {SAMPLERS}), got {cfg.sampler!r}")
        if cfg.noise_level <= 0:
            raise ConfigError("grpo.noise_level must be > 0: deterministic rollouts have no log-probs to train")
        if cfg.sampler == "cps" and cfg.noise_level > 1:
            raise ConfigError(f"grpo.noise_level is CPS's eta and must lie in (0, 1], got {cfg.noise_level}")
        if cfg.rollout_batch_size < 1 or cfg.train_batch_size < 1:
            raise ConfigError("grpo.rollout_batch_size and grpo.train_batch_size must be >= 1")
        if cfg.group_size < 2 and not cfg.per_prompt_stats:
            raise ConfigError("grpo.group_size must be >= 2 (or set grpo.per_prompt_stats) for group advantages")
        if cfg.window not in ("adaptive", "sliding", "fixed", "all"):
            raise ConfigError(f"grpo.window must be 'adaptive', 'sliding', 'fixed' or 'all', got {cfg.window!r}")
        if cfg.window_signal not in ("noise", "logp_change"):
            raise ConfigError(f"grpo.window_signal must be 'noise' or 'logp_change', got {cfg.window_signal!r}")
        if (cfg.height % 16) or (cfg.width % 16):
            raise ConfigError(f"grpo.height/width must be multiples of 16, got {cfg.height}x{cfg.width}")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the adaptive window's step scores and the exploration RNG continue across a resume
        checkpoint["grpo_state"] = {"step_scores": self.step_scores, "rng": self._rng.getstate(),
                                    "tracker": {k: list(v) for k, v in self.tracker.history.items()} if self.tracker else None}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("grpo_state")
        if not state:
            return
        self.step_scores = state["step_scores"]
        self._rng.setstate(state["rng"])
        if self.tracker is not None and state.get("tracker"):
            for k, v in state["tracker"].items():
                self.tracker.history[k].extend(v)

    # ------------------------------------------------------------------------------------ models
    @property
    def reference(self):
        """Frozen reference backbone (sharded by parallelize_module); None with LoRA or kl_beta = 0."""
        return self._frozen.get("reference")

    def build_frozen(self) -> None:
        super().build_frozen()
        if self.lora_cfg.enabled:
            self._add_lora()
        elif self.grpo.kl_beta > 0:
            ref = copy.deepcopy(self.backbone).eval()
            ref.requires_grad_(False)
            self._frozen["reference"] = ref

    def supports_sharded_init(self) -> bool:
        return not self.lora_cfg.enabled  # LoRA layers are initialised by peft, not by the pretrained weights

    def _add_lora(self) -> None:
        from peft import LoraConfig

        cfg = self.lora_cfg
        self.backbone.requires_grad_(False)
        self.backbone.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                             target_modules=list(cfg.target_modules), init_lora_weights="gaussian"))
        if not any(p.requires_grad for p in self.backbone.parameters()):
            raise ConfigError(f"lora.target_modules {cfg.target_modules} matched no layer of the backbone")

    def reference_velocity(self, x, sigma, embeds, txt, img, negative) -> torch.Tensor:
        g = self.grpo.guidance_scale
        if self.lora_cfg.enabled:
            self.backbone.disable_adapters()
            try:
                return velocity(self.backbone, x, sigma, embeds, txt, img, negative, guidance_scale=g)
            finally:
                self.backbone.enable_adapters()
        return velocity(self.reference, x, sigma, embeds, txt, img, negative, guidance_scale=g)

    def build_rewards(self):
        """The weighted reward ensemble (`lit_ovis.scoring.ScorerEnsemble`): `grpo.rewards` {name: weight} from the
        scorer registry with `grpo.reward_kwargs`, or the caller's `reward_fns` {name: fn}."""
        if self._reward_ensemble is None:
            from lit_ovis.scoring import ScorerEnsemble, json_option

            self._reward_ensemble = ScorerEnsemble.from_weights(
                self.grpo.rewards, self.grpo.reward_kwargs, "none", option=json_option("--model.grpo.reward_kwargs"),
                scorers=self.reward_fns,
            )
        return self._reward_ensemble

    # ------------------------------------------------------------------------------------ rollout
    @torch.no_grad()
    def rollout(self, prompts: list[str]) -> dict[str, Any]:
        """G stochastic rollouts per prompt; returns the trajectory, conditioning and decoded images."""
        cfg = self.grpo
        self.place_frozen()
        n_prompts = len(prompts)
        prompts_rep = [p for p in prompts for _ in range(cfg.group_size)]
        n = len(prompts_rep)
        embeds = self.text_encoder.encode(prompts).to(self.device, self.compute_dtype)
        embeds = embeds.repeat_interleave(cfg.group_size, 0)
        negative = self.empty_embed.expand(n, -1, -1) if cfg.guidance_scale > 1.0 else None
        lh, lw = latent_size(cfg.height, cfg.width)
        img = latent_image_ids(lh, lw, device=self.device, dtype=embeds.dtype)
        txt = text_ids(embeds.shape[1], device=self.device, dtype=embeds.dtype)
        seed = cfg.seed + 1_000_003 * self.global_step + 7919 * self.global_rank
        gen = torch.Generator(device=self.device).manual_seed(seed)
        noise = initial_noise(n, cfg.height, cfg.width, gen, device=self.device, dtype=embeds.dtype)
        s = self.sampling_cfg
        sigmas = sigma_schedule(cfg.rollout_steps, noise.shape[1], s.base_seq_len, s.max_seq_len, s.base_shift, s.max_shift)
        was_training = self.backbone.training
        self.backbone.eval()
        parts = []
        try:
            for i in range(0, n, cfg.rollout_batch_size):
                sl = slice(i, i + cfg.rollout_batch_size)
                parts.append(sde_sample(
                    self.backbone, noise[sl], embeds[sl], txt, img, sigmas, cfg.sampler, cfg.noise_level,
                    None if negative is None else negative[sl], cfg.guidance_scale, gen, cfg.log_prob_reduce,
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
                    images=images, n_prompts=n_prompts)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> tuple[torch.Tensor, dict]:
        """Weighted reward ensemble [N] and each scorer's raw scores."""
        total, per = self.build_rewards()(images, prompts, metadata)
        return total.to(self.device), {k: v.to(self.device) for k, v in per.items()}

    # ------------------------------------------------------------------------------------ window
    def choose_window(self, traj: Trajectory, adv: torch.Tensor, keys: torch.Tensor) -> tuple[int, int]:
        cfg = self.grpo
        valid = (traj.std > 0).cpu()
        k = valid.numel()
        if cfg.window == "all":
            return fixed_window(k, 0, 0, valid)
        if cfg.window == "fixed":
            return fixed_window(k, cfg.window_start, cfg.window_size, valid)
        if cfg.window == "sliding":  # derived from global_step, so a resumed run continues the schedule
            iteration = self.global_step // self._opt_steps_per_iter(adv.shape[0])
            start = sliding_window_start(iteration, int(valid.sum()), cfg.window_size, cfg.window_shift_every, cfg.window_stride)
            return fixed_window(k, start, cfg.window_size, valid)
        if cfg.window_signal == "noise":
            sig = noise_advantage_signal(traj.noise, adv, keys)
            if dist.is_available() and dist.is_initialized():  # identical window on every rank
                dist.all_reduce(sig)
                sig = sig / dist.get_world_size()
            self.step_scores = update_step_scores(self.step_scores, sig.cpu(), cfg.window_ema)
        elif self.step_scores is None or self._rng.random() < cfg.window_explore:
            # logp_change scores exist only for trained steps: explore a random window (same seed on all ranks)
            if self.step_scores is None:
                self.step_scores = torch.zeros(k)
            starts = [s for s in range(k - cfg.window_size + 1) if bool(valid[s:s + cfg.window_size].all())]
            start = self._rng.choice(starts) if starts else 0
            return fixed_window(k, start, cfg.window_size, valid)
        return select_window(self.step_scores, cfg.window_size, valid)

    # ------------------------------------------------------------------------------------ update
    def step_log_prob(self, model_v: torch.Tensor, x, x_next, sigma, sigma_next):
        return sampler_step(self.grpo.sampler, x, model_v, sigma, sigma_next, noise_level=self.grpo.noise_level,
                            prev_sample=x_next, reduce=self.grpo.log_prob_reduce)

    def training_step(self, batch: dict[str, Any], batch_idx: int):
        cfg = self.grpo
        opt = self.optimizers()
        sched = self.lr_schedulers()
        prompts = list(batch["prompts"])
        targets = list(batch.get("target_texts", [""] * len(prompts)))
        langs = list(batch.get("languages", [""] * len(prompts)))

        ro = self.rollout(prompts)
        traj: Trajectory = ro["traj"]
        n = traj.latents.shape[0]
        metadata = [{"target_text": t, "language": l} for t, l in zip(targets, langs) for _ in range(cfg.group_size)]
        reward, per_scorer = self.score(ro["images"], ro["prompts"], metadata)
        keys = prompt_keys(ro["prompts"], device=self.device)
        adv = global_group_advantages(reward, keys, cfg.adv_eps, cfg.global_std, self.tracker).to(self.device)
        start, end = self.choose_window(traj, adv, keys)
        window = list(range(start, end))

        stats = self._update(ro, traj, adv, window, opt, sched)

        log = {"reward/mean": reward.mean(), "reward/std": reward.std(unbiased=False)}
        for name, r in per_scorer.items():
            log[f"reward/{name}_mean"], log[f"reward/{name}_std"] = r.mean(), r.std(unbiased=False)
        log.update({"adv/mean": adv.mean(), "adv/std": adv.std(unbiased=False), "adv/abs_max": adv.abs().max(),
                    "window/start": float(start), "window/end": float(end)})
        log.update(stats)
        self.log_dict(log, on_step=True, prog_bar=False, batch_size=n)
        self.log("train/reward", reward.mean(), on_step=True, prog_bar=True, batch_size=n)
        if self.step_scores is not None and cfg.window == "adaptive":
            self.log_dict({f"window/score_{k}": float(v) for k, v in enumerate(self.step_scores)}, on_step=True, batch_size=n)
        self._log_images(ro["images"], reward)
        return None

    def _update(self, ro, traj: Trajectory, adv, window, opt, sched) -> dict[str, torch.Tensor]:
        cfg = self.grpo
        n = traj.latents.shape[0]
        sigmas = traj.sigmas
        gen = torch.Generator().manual_seed(cfg.seed + self.global_step)  # same permutation on every rank
        acc: dict[str, list[torch.Tensor]] = {}
        logp_change = torch.zeros(traj.log_probs.shape[1])
        logp_count = torch.zeros_like(logp_change)
        n_mb = -(-n // cfg.train_batch_size)
        accumulate = -(-n_mb // max(1, min(cfg.optimizer_steps_per_epoch, n_mb)))
        for _ in range(cfg.inner_epochs):
            perm = torch.randperm(n, generator=gen)
            for mb, b in enumerate(range(0, n, cfg.train_batch_size)):
                idx = perm[b: b + cfg.train_batch_size].to(self.device)
                steps = list(window)
                if cfg.shuffle_window_steps:
                    steps = [steps[i] for i in torch.randperm(len(steps), generator=gen).tolist()]
                neg = None if ro["negative"] is None else ro["negative"][idx]
                for k in steps:
                    x, x_next = traj.latents[idx, k], traj.latents[idx, k + 1]
                    v = velocity(self.backbone, x, sigmas[k], ro["embeds"][idx], ro["txt"], ro["img"], neg,
                                 guidance_scale=cfg.guidance_scale)
                    out = self.step_log_prob(v, x, x_next, sigmas[k], sigmas[k + 1])
                    loss, st = ppo_clip_loss(out.log_prob, traj.log_probs[idx, k], adv[idx], cfg.clip_range, cfg.adv_clip_max)
                    st["policy_loss"] = loss.detach()
                    if cfg.kl_beta > 0:
                        with torch.no_grad():
                            v_ref = self.reference_velocity(x, sigmas[k], ro["embeds"][idx], ro["txt"], ro["img"], neg)
                            ref_mean = self.step_log_prob(v_ref, x, x_next, sigmas[k], sigmas[k + 1]).mean
                        kl = gaussian_step_kl(out.mean, ref_mean, out.std, cfg.log_prob_reduce).mean()
                        loss = loss + cfg.kl_beta * kl
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
        if cfg.window == "adaptive" and cfg.window_signal == "logp_change":
            seen = logp_count > 0
            sig = torch.where(seen, logp_change / logp_count.clamp_min(1), torch.zeros_like(logp_change))
            if dist.is_available() and dist.is_initialized():
                sig = sig.to(self.device)
                dist.all_reduce(sig)
                sig = (sig / dist.get_world_size()).cpu()
            new = update_step_scores(self.step_scores, sig, cfg.window_ema)
            self.step_scores = torch.where(seen, new, self.step_scores)
        out = {f"train/{k}": torch.stack(v).mean() for k, v in acc.items() if k not in ("ratio_min", "ratio_max")}
        if "ratio_min" in acc:
            out["train/ratio_min"] = torch.stack(acc["ratio_min"]).min()
            out["train/ratio_max"] = torch.stack(acc["ratio_max"]).max()
        return out

    def _clip_and_step(self, opt, sched, acc) -> None:
        max_norm = self.optim_cfg.grad_clip
        if max_norm and max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), max_norm)
            if hasattr(norm, "full_tensor"):
                norm = norm.full_tensor()
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
        experiment.add_image("rollouts", reward_grid(images[:m], rewards[:m], nrow=self.grpo.group_size), self.global_step)

    def _opt_steps_per_iter(self, n: int) -> int:
        n_mb = -(-n // self.grpo.train_batch_size)
        accumulate = -(-n_mb // max(1, min(self.grpo.optimizer_steps_per_epoch, n_mb)))
        return self.grpo.inner_epochs * -(-n_mb // accumulate)
