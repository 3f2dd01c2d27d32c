"""Prompt -> image generation built from the pure pieces (encoder, noise, schedule, Euler, VAE).

Used by every stage module's `sample()`, the sample-grid callback, `predict` and `eval`. With the same
weights, prompt and seed it returns what `OvisImagePipeline` returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lit_ovis.models.text_encoder import OvisTextEncoder, text_ids
from lit_ovis.models.vae import LATENT_CHANNELS, VAE_SCALE, FluxVAE, latent_image_ids, latent_size, pack_latents, unpack_latents
from lit_ovis.sampling.ode import euler_sample, sigma_schedule, uses_cfg


@dataclass
class SamplingConfig:
    """Image generation (sample grids, predict, eval; GRPO rollouts override steps). Defaults equal the released
    pipeline's (1024x1024, 50 steps, CFG 5, empty negative prompt)."""

    steps: int = 50
    """Euler denoising steps."""
    guidance_scale: float = 5.0
    """Classifier-free guidance scale (<= 1: no unconditional branch)."""
    height: int = 1024
    """Image height in px (multiple of 16)."""
    width: int = 1024
    """Image width in px (multiple of 16)."""
    negative_prompt: str = ""
    """Prompt of CFG's unconditional branch."""
    batch_cfg: bool = True
    """Run the conditional and unconditional branches in one batched forward (faster)."""
    base_seq_len: int = 256
    """Image tokens at which the schedule's resolution shift is base_shift (the scheduler's base_image_seq_len)."""
    max_seq_len: int = 4096
    """Image tokens at which the shift is max_shift (the scheduler's max_image_seq_len)."""
    base_shift: float = 0.5
    """Resolution shift mu at base_seq_len."""
    max_shift: float = 1.15
    """Resolution shift mu at max_seq_len."""


def initial_noise(
    batch: int, height: int, width: int, generator: torch.Generator | None, device=None, dtype=torch.float32,
    channels: int = LATENT_CHANNELS, scale: int = VAE_SCALE,
) -> torch.Tensor:
    """Packed Gaussian noise drawn exactly like the pipeline (unpacked [B,C,h,w] draw, then packed); `channels`
    is the transformer's in_channels // 4 and `scale` the VAE's downsampling factor."""
    h, w = latent_size(height, width, scale)
    gen_device = generator.device if generator is not None else device
    noise = torch.randn((batch, channels, h, w), generator=generator, device=gen_device, dtype=dtype)
    return pack_latents(noise.to(device))


def latent_channels_of(transformer) -> int:
    """Latent channels the transformer denoises: its packed 2x2 patches have in_channels = 4 x channels."""
    config = getattr(transformer, "config", None)
    return int(config.in_channels) // 4 if config is not None and "in_channels" in config else LATENT_CHANNELS


@torch.no_grad()
def generate_latents(
    transformer,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor | None,
    height: int,
    width: int,
    cfg: SamplingConfig,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    scale: int = VAE_SCALE,
) -> torch.Tensor:
    """Sample unpacked normalised latents [B, C, h, w] from text embeddings (`scale`: the VAE's factor)."""
    device, dtype = prompt_embeds.device, prompt_embeds.dtype
    b = prompt_embeds.shape[0]
    if noise is None:
        noise = initial_noise(b, height, width, generator, device=device, dtype=dtype,
                              channels=latent_channels_of(transformer), scale=scale)
    h, w = latent_size(height, width, scale)
    img_ids = latent_image_ids(h, w, device=device, dtype=dtype)
    txt = text_ids(prompt_embeds.shape[1], device=device, dtype=dtype)
    sigmas = sigma_schedule(cfg.steps, noise.shape[1], cfg.base_seq_len, cfg.max_seq_len, cfg.base_shift, cfg.max_shift)
    packed = euler_sample(
        transformer, noise, prompt_embeds, txt, img_ids, sigmas,
        negative_embeds=negative_embeds, guidance_scale=cfg.guidance_scale, batch_cfg=cfg.batch_cfg,
    )
    return unpack_latents(packed, h, w)


@torch.no_grad()
def generate_images(
    transformer,
    text_encoder: OvisTextEncoder,
    vae: FluxVAE,
    prompts: list[str],
    cfg: SamplingConfig,
    seed: int | list[int] = 0,
    height: int | None = None,
    width: int | None = None,
) -> torch.Tensor:
    """Prompts -> images [B, 3, H, W] in [0, 1]. One seed per prompt (or a base seed, incremented)."""
    height, width = height or cfg.height, width or cfg.width
    param = next(transformer.parameters())
    # The encoders may run in bf16 beside an fp32 backbone (or the other way round): feed the backbone its
    # own dtype, as the pipeline does (FSDP2 mixed precision then casts to its compute dtype itself).
    device, dtype = param.device, param.dtype
    seeds = seed if isinstance(seed, list) else [seed + i for i in range(len(prompts))]
    embeds = text_encoder.encode(prompts).to(device, dtype)
    negative = None
    if uses_cfg(cfg.guidance_scale):
        negative = text_encoder.encode([cfg.negative_prompt] * len(prompts)).to(device, dtype)
    # One generator per sample so an image does not depend on its batch neighbours.
    channels, scale = latent_channels_of(transformer), vae.scale_factor
    noise = torch.cat([
        initial_noise(1, height, width, torch.Generator("cpu").manual_seed(s), device=device, dtype=embeds.dtype,
                      channels=channels, scale=scale)
        for s in seeds
    ])
    latents = generate_latents(transformer, embeds, negative, height, width, cfg, noise=noise, scale=scale)
    images = vae.decode(latents.to(next(vae.parameters()).device))
    return (images.float() / 2 + 0.5).clamp(0, 1)
