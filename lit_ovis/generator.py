"""Load something that can `sample(prompts, seed, steps, guidance_scale, height, width)` from a training
checkpoint (.ckpt file or sharded directory) or an exported diffusers folder; used by eval and make-pairs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from lit_ovis.checkpoints import backbone_state_dict, config_section, load_training_checkpoint
from lit_ovis.errors import CheckpointError
from lit_ovis.models.backbone import build_backbone
from lit_ovis.models.text_encoder import OvisTextEncoder, build_text_encoder
from lit_ovis.models.vae import FluxVAE, build_vae
from lit_ovis.modules.config import BackboneConfig, EncoderConfig
from lit_ovis.sampling.generate import SamplingConfig, generate_images


class Generator:
    def __init__(self, transformer, text_encoder: OvisTextEncoder, vae: FluxVAE, sampling: SamplingConfig):
        self.transformer = transformer.eval()
        self.text_encoder, self.vae, self.sampling = text_encoder, vae, sampling

    def to(self, device):
        for m in (self.transformer, self.text_encoder, self.vae):
            m.to(device)
        return self

    @torch.no_grad()
    def sample(self, prompts, seed=0, steps=None, guidance_scale=None, height=None, width=None) -> torch.Tensor:
        cfg = replace(self.sampling, **{k: v for k, v in {"steps": steps, "guidance_scale": guidance_scale}.items() if v is not None})
        return generate_images(self.transformer, self.text_encoder, self.vae, list(prompts), cfg, seed, height, width)


def load_generator(path: str, max_sequence_length: int | None = None, use_ema: bool | None = None) -> Generator:
    """`use_ema=None`: the weights the run sampled with (EMA when it had and used one), like `export`."""
    p = Path(path)
    if (p / "model_index.json").exists():
        from diffusers import OvisImagePipeline

        pipe = OvisImagePipeline.from_pretrained(p)
        sched = pipe.scheduler.config
        sampling = SamplingConfig(base_shift=sched.get("base_shift", 0.5), max_shift=sched.get("max_shift", 1.15),
                                  base_seq_len=sched.get("base_image_seq_len", 256), max_seq_len=sched.get("max_image_seq_len", 4096))
        encoder = OvisTextEncoder(pipe.text_encoder, pipe.tokenizer, max_sequence_length or 256)
        return Generator(pipe.transformer, encoder, FluxVAE(pipe.vae), sampling)
    if not p.exists():
        raise CheckpointError(f"{path}: not found; pass a .ckpt, a sharded checkpoint directory or an exported diffusers folder")
    ckpt = load_training_checkpoint(p, ema=use_ema is not False)
    backbone_cfg = config_section(ckpt, "backbone", BackboneConfig)
    encoders, sampling = config_section(ckpt, "encoders", EncoderConfig), config_section(ckpt, "sampling", SamplingConfig)
    transformer = build_backbone(backbone_cfg.preset)
    transformer.load_state_dict(backbone_state_dict(ckpt, use_ema=use_ema), strict=True)
    encoder = build_text_encoder(encoders.text_encoder, max_sequence_length or encoders.max_sequence_length)
    return Generator(transformer, encoder, build_vae(encoders.vae), sampling)
