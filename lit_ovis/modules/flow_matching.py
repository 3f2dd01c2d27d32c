"""Flow-matching pretraining and SFT (report Stage 1): one module, resolution and data set by config."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import MeanMetric

from lit_ovis import flow
from lit_ovis.models.vae import pack_latents
from lit_ovis.modules.base import OvisBaseModule
from lit_ovis.modules.config import BackboneConfig, EMAConfig, EncoderConfig, FlowConfig, LoRAConfig, OptimizerConfig
from lit_ovis.parallel.fsdp import ParallelConfig
from lit_ovis.sampling.generate import SamplingConfig


class FlowMatchingModule(OvisBaseModule):
    def __init__(
        self,
        backbone: BackboneConfig = BackboneConfig(),
        encoders: EncoderConfig = EncoderConfig(),
        optimizer: OptimizerConfig = OptimizerConfig(),
        ema: EMAConfig = EMAConfig(),
        sampling: SamplingConfig = SamplingConfig(),
        parallel: ParallelConfig = ParallelConfig(),
        flow_matching: FlowConfig = FlowConfig(),
        lora: LoRAConfig = LoRAConfig(),
    ):
        super().__init__(backbone, encoders, optimizer, ema, sampling, parallel, lora)
        self.flow_cfg = flow_matching
        # Per-timestep-range loss means. nan_strategy="disable" skips torchmetrics' `if nans.any()` (a host sync
        # every step); non-finite losses get weight 0 in `_log_timestep_buckets` instead, on the device.
        self.bucket_loss = torch.nn.ModuleList(
            MeanMetric(nan_strategy="disable") for _ in range(max(flow_matching.loss_buckets, 0))
        )

    def flow_loss(self, batch: dict[str, Any], generator: torch.Generator | None = None):
        """Loss, per-sample losses and timesteps for one batch (shared with validation)."""
        cfg = self.flow_cfg
        x0 = batch["latents"].to(self.device, self.compute_dtype)
        b = x0.shape[0]
        embeds = self.embed_prompts(batch)
        if self.training and cfg.caption_dropout > 0:
            drop = flow.caption_dropout_mask(b, cfg.caption_dropout, generator, device=self.device)
            embeds = flow.apply_caption_dropout(embeds, self.empty_embed, drop)
        cond = self.conditioning(x0.shape[2], x0.shape[3], embeds)
        x0_packed = pack_latents(x0)
        if "timesteps" in batch:  # fixed noise/timesteps (reproducibility checks, parity tests)
            t = batch["timesteps"].to(self.device, torch.float32)
            noise = pack_latents(batch["noise"].to(self.device, x0.dtype))
        else:
            t = flow.sample_timesteps(b, cfg.timestep_sampling, cfg.logit_mean, cfg.logit_std, generator, device=self.device)
            t = flow.shift_timesteps(t, cfg.timestep_shift, cfg.shift, image_seq_len=x0_packed.shape[1])
            noise = torch.randn(x0_packed.shape, generator=generator, device=self.device, dtype=x0_packed.dtype)
        x_t = flow.interpolate(x0_packed, noise, t)
        pred = self.predict_velocity(self.backbone, x_t, t, cond)
        loss, per_sample = flow.flow_matching_loss(pred, flow.velocity_target(x0_packed, noise), flow.loss_weights(t, cfg.loss_weighting))
        return loss, per_sample, t

    def training_step(self, batch: dict[str, Any], batch_idx: int):
        loss, per_sample, t = self.flow_loss(batch, generator=self.step_generator(batch_idx))
        # not prog_bar: Lightning would read prog_bar values on the host every step; the progress display
        # (callbacks.progress) reads this one at the logging interval
        self.log("train/loss", loss, on_step=True, batch_size=per_sample.shape[0])
        self._log_timestep_buckets("train", per_sample.detach(), t)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int):
        # Fixed noise and timesteps per batch, so validation curves are comparable across evaluations.
        gen = torch.Generator(device=self.device).manual_seed(batch_idx)
        loss, per_sample, t = self.flow_loss(batch, generator=gen)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=per_sample.shape[0])
        return loss

    def _log_timestep_buckets(self, stage: str, per_sample: torch.Tensor, t: torch.Tensor) -> None:
        n = len(self.bucket_loss)
        if n <= 1:
            return
        buckets = flow.timestep_buckets(t, n)
        finite = torch.isfinite(per_sample)
        values = torch.where(finite, per_sample, torch.zeros_like(per_sample))
        for k, metric in enumerate(self.bucket_loss):
            metric.update(values, weight=((buckets == k) & finite).to(per_sample.dtype))
            self.log(f"{stage}/loss_t{k}", metric, on_step=False, on_epoch=True)
