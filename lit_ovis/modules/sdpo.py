"""Diffusion-DPO with the Diffusion-SDPO winner-preserving safeguard (report Stage 2, Eqs. 1-3).

The policy (`self.backbone`, trainable) and the reference (`self.reference`, frozen) both start from the SFT
checkpoint given as `backbone.pretrained` (a lit-ovis `.ckpt`, `.safetensors` or diffusers folder); set
`sdpo.reference_pretrained` to load the reference from a different file. The reference is a deep copy of the
backbone built before any parallelism: it lives in `self._frozen` (outside the module tree), so it is never in
the optimizer or a checkpoint, stays in eval mode with requires_grad False, and `parallelize_module` shards it
on the same mesh and mixed-precision policy as the policy. It also runs the policy's code path: after
`parallelize_module`, `OvisBaseModule.match_policy_code_path` copies the policy's attention backend to it and
compiles its blocks when the policy's are compiled, so that policy == reference gives identical errors (with
beta in the thousands, a kernel-level difference between the two would be a constant bias in every implicit
reward). On resume the reference is rebuilt from the same SFT weights. With `lora.enabled` there is no copy: the
reference is the backbone with its adapter switched off (`OvisBaseModule.reference_model`), i.e. the frozen base.

One training step (the math lives in `lit_ovis.losses.dpo`):
  shared noise and timestep per pair -> x_t for winner and loser -> policy velocities for both in one batched
  forward ([winner; loser] concatenated along the batch) -> reference velocities (no grad, also batched) ->
  Diffusion-DPO on the per-sample flow-matching errors, the loser branch's gradient scaled per pair by
  lambda_safe when `sdpo.safeguard.enabled` (the settings travel as one `SafeguardConfig`).
Timesteps are drawn with the flow-matching stage's settings (`SDPOConfig` extends `TimestepConfig`).
One name for the stage everywhere: this file, `SDPOModule`, `SDPOConfig`, the config section `sdpo`, `sdpo_loss`.

Batches: `{"latents_w": [B,16,h,w], "latents_l": [B,16,h,w], "prompt_embeds"?: [B,L,D], "captions": [...]}`
(docs/CONTRACT.md, from `data_modules.preference`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lit_ovis import flow
from lit_ovis.errors import ConfigError
from lit_ovis.losses.dpo import SafeguardConfig, sdpo_loss
from lit_ovis.models.backbone import architecture_of, build_backbone
from lit_ovis.models.vae import pack_latents
from lit_ovis.modules.base import OvisBaseModule
from lit_ovis.modules.config import BackboneConfig, EMAConfig, EncoderConfig, LoRAConfig, OptimizerConfig, TimestepConfig
from lit_ovis.parallel.fsdp import ParallelConfig
from lit_ovis.sampling.generate import SamplingConfig


@dataclass
class SDPOConfig(TimestepConfig):
    """Diffusion-DPO with the Diffusion-SDPO safeguard; timesteps as in the flow-matching stage."""

    beta: float = 5000.0
    """Diffusion-DPO temperature with T folded in (mean-reduced errors, so thousands; see lit_ovis/losses/dpo.py)."""
    safeguard: SafeguardConfig = field(default_factory=SafeguardConfig)
    """The winner-preserving loser scale lambda_safe."""
    batched_forward: bool = True
    """Winner and loser in one forward (2B); false = two forwards (less activation memory)."""
    reference_pretrained: str | None = None
    """Weights of the frozen reference; unset: the same weights as the policy (backbone.pretrained)."""


class SDPOModule(OvisBaseModule):
    def __init__(
        self,
        backbone: BackboneConfig = BackboneConfig(),
        encoders: EncoderConfig = EncoderConfig(),
        optimizer: OptimizerConfig = OptimizerConfig(),
        ema: EMAConfig = EMAConfig(),
        sampling: SamplingConfig = SamplingConfig(),
        parallel: ParallelConfig = ParallelConfig(),
        sdpo: SDPOConfig = SDPOConfig(),
        lora: LoRAConfig = LoRAConfig(),
    ):
        super().__init__(backbone, encoders, optimizer, ema, sampling, parallel, lora)
        if lora.enabled and sdpo.reference_pretrained:
            raise ConfigError("--model.sdpo.reference_pretrained cannot be used with --model.lora.enabled true: the LoRA "
                              "run's reference is its adapter-off base (backbone.pretrained); unset one of them")
        if sdpo.beta <= 0:
            raise ConfigError(f"--model.sdpo.beta must be > 0 (got {sdpo.beta}); the report uses a large beta (thousands)")
        sdpo.safeguard.check()
        self.sdpo = sdpo

    # ------------------------------------------------------------------------------------ models
    def needs_reference(self) -> bool:
        return True

    def build_reference(self) -> torch.nn.Module:
        path = self.sdpo.reference_pretrained
        # The reference is the policy's starting point: same architecture, whatever the preset says.
        return (build_backbone(self.backbone_cfg.preset, path, architecture=architecture_of(self.backbone)) if path
                else super().build_reference())

    def train_flops_per_pair(self, latent_h: int, latent_w: int) -> int:
        """Model FLOPs of one pair for the throughput/MFU logger: policy forward+backward on winner and loser,
        plus the frozen reference's forwards on both."""
        from lit_ovis.parallel.flops import dpo_train_flops

        tokens = (latent_h // 2) * (latent_w // 2)
        return dpo_train_flops(dict(self.backbone.config), tokens, self.encoders_cfg.max_sequence_length,
                               reference=True)  # a copy, or with LoRA the adapter-off backbone: one more forward either way

    def train(self, mode: bool = True):
        super().train(mode)
        if self.reference is not None:  # the reference never leaves eval mode (no dropout)
            self.reference.eval()
        return self

    def _reshard_reference(self) -> None:
        # FSDP2 keeps the root module's parameters gathered after forward (it expects a backward to follow);
        # the reference never runs backward, so free its root parameters explicitly.
        reshard = getattr(self.reference, "reshard", None)  # None with LoRA: the policy's own backward follows
        if callable(reshard):
            reshard()

    # ------------------------------------------------------------------------------------ loss
    def velocities(self, model, x_w, x_l, t, cond_w: dict, cond_l: dict, batched: bool):
        """Velocities for winner and loser x_t; one forward over [winner; loser] when `batched`."""
        if batched:
            cond = dict(cond_w, encoder_hidden_states=torch.cat([cond_w["encoder_hidden_states"]] * 2))
            pred = self.predict_velocity(model, torch.cat([x_w, x_l]), torch.cat([t, t]), cond)
            return pred.chunk(2)
        return self.predict_velocity(model, x_w, t, cond_w), self.predict_velocity(model, x_l, t, cond_l)

    def pair_loss(self, batch: dict[str, Any], generator: torch.Generator | None = None):
        """(loss, stats) for one preference batch; shared with validation (fixed generator there)."""
        cfg = self.sdpo
        x0_w = batch["latents_w"].to(self.device, self.compute_dtype)
        x0_l = batch["latents_l"].to(self.device, self.compute_dtype)
        if x0_w.shape != x0_l.shape:
            raise ValueError(f"preference batch: latents_w {tuple(x0_w.shape)} and latents_l {tuple(x0_l.shape)} differ; "
                             "winner and loser of a pair must share a resolution bucket")
        b = x0_w.shape[0]
        embeds = self.embed_prompts(batch)
        cond = self.conditioning(x0_w.shape[2], x0_w.shape[3], embeds)
        pw, pl = pack_latents(x0_w), pack_latents(x0_l)
        t = flow.sample_timesteps(b, cfg.timestep_sampling, cfg.logit_mean, cfg.logit_std, generator, device=self.device)
        t = flow.shift_timesteps(t, cfg.timestep_shift, cfg.shift, image_seq_len=pw.shape[1])
        # Same noise and timestep for winner and loser (Diffusion-DPO): the comparison is paired.
        noise = torch.randn(pw.shape, generator=generator, device=self.device, dtype=pw.dtype)
        x_w, x_l = flow.interpolate(pw, noise, t), flow.interpolate(pl, noise, t)
        target_w, target_l = flow.velocity_target(pw, noise), flow.velocity_target(pl, noise)
        pred_w, pred_l = self.velocities(self.backbone, x_w, x_l, t, cond, cond, cfg.batched_forward)
        with torch.no_grad(), self.reference_model() as reference:
            ref_w, ref_l = self.velocities(reference, x_w, x_l, t, cond, cond, cfg.batched_forward)
        self._reshard_reference()
        weights = flow.loss_weights(t, cfg.loss_weighting)
        return sdpo_loss(pred_w, pred_l, target_w, target_l, ref_w, ref_l, cfg.beta, weights, cfg.safeguard)

    def training_step(self, batch: dict[str, Any], batch_idx: int):
        # Per-(seed, rank, step, micro-batch) noise: ranks differ, and a resumed run redraws the same noise.
        loss, stats = self.pair_loss(batch, generator=self.step_generator(batch_idx))
        b = batch["latents_w"].shape[0]
        # not prog_bar: Lightning would read prog_bar values on the host every step; the progress display
        # (callbacks.progress) reads these at the logging interval
        self.log("train/loss", loss, on_step=True, batch_size=b)
        self.log("train/implicit_acc", stats.pop("implicit_acc"), on_step=True, batch_size=b)
        self.log_dict({f"train/{k}": v for k, v in stats.items()}, on_step=True, batch_size=b)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int):
        gen = torch.Generator(device=self.device).manual_seed(batch_idx)
        loss, stats = self.pair_loss(batch, generator=gen)
        b = batch["latents_w"].shape[0]
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=b)
        keep = ("implicit_acc", "reward_margin", "policy_loss_w", "policy_loss_l", "ref_loss_w", "ref_loss_l")
        self.log_dict({f"val/{k}": stats[k] for k in keep}, on_epoch=True, sync_dist=True, batch_size=b)
        return loss
