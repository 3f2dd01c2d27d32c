"""Euler ODE sampler with classifier-free guidance, step for step equal to diffusers' `OvisImagePipeline`.

The sigma schedule is the pipeline's: linspace(1, 1/N, N), the FLUX exponential time shift with mu from
the image token count, and a final 0. CFG runs the conditional and unconditional branches in one
batched forward (`batch_cfg=True`, faster) or in two (bit-closer to the pipeline's order of operations).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from lit_ovis.flow import resolution_shift_mu


def sigma_schedule(
    num_steps: int,
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
    dynamic_shift: bool = True,
    shift: float = 1.0,
) -> torch.Tensor:
    """Sigmas [num_steps + 1], from ~1 down to 0, in float32 like FlowMatchEulerDiscreteScheduler."""
    sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    if dynamic_shift:
        mu = resolution_shift_mu(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift)
        sigmas = np.exp(mu) / (np.exp(mu) + (1.0 / sigmas - 1.0))
    else:
        sigmas = shift * sigmas / (1.0 + (shift - 1.0) * sigmas)
    sigmas = torch.from_numpy(np.asarray(sigmas)).to(torch.float32)
    return torch.cat([sigmas, torch.zeros(1)])


def uses_cfg(guidance_scale: float) -> bool:
    """Classifier-free guidance runs (an unconditional branch is needed) only for a scale above 1, as in the pipeline."""
    return guidance_scale > 1.0


def model_timestep(sigma: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """The pipeline feeds `sigma * 1000 / 1000` (its scheduler timesteps rescaled); keep that rounding."""
    return ((sigma * 1000.0).expand(batch).to(dtype)) / 1000.0


def velocity(
    transformer: Callable,
    latents: torch.Tensor,
    sigma: torch.Tensor,
    prompt_embeds: torch.Tensor,
    text_ids: torch.Tensor,
    img_ids: torch.Tensor,
    negative_embeds: torch.Tensor | None = None,
    negative_text_ids: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    batch_cfg: bool = True,
) -> torch.Tensor:
    """Guided velocity v = v_neg + g (v_cond - v_neg) at one sigma (plain v_cond without guidance)."""
    b = latents.shape[0]
    timestep = model_timestep(sigma, b, latents.dtype)
    use_cfg = negative_embeds is not None and uses_cfg(guidance_scale)
    if not use_cfg:
        return transformer(
            hidden_states=latents, timestep=timestep, encoder_hidden_states=prompt_embeds,
            txt_ids=text_ids, img_ids=img_ids, return_dict=False,
        )[0]
    neg_ids = text_ids if negative_text_ids is None else negative_text_ids
    if batch_cfg and negative_embeds.shape[1] == prompt_embeds.shape[1]:
        out = transformer(
            hidden_states=torch.cat([latents, latents]),
            timestep=torch.cat([timestep, timestep]),
            encoder_hidden_states=torch.cat([prompt_embeds, negative_embeds]),
            txt_ids=text_ids, img_ids=img_ids, return_dict=False,
        )[0]
        cond, neg = out.chunk(2)
    else:
        cond = transformer(
            hidden_states=latents, timestep=timestep, encoder_hidden_states=prompt_embeds,
            txt_ids=text_ids, img_ids=img_ids, return_dict=False,
        )[0]
        neg = transformer(
            hidden_states=latents, timestep=timestep, encoder_hidden_states=negative_embeds,
            txt_ids=neg_ids, img_ids=img_ids, return_dict=False,
        )[0]
    return neg + guidance_scale * (cond - neg)


def euler_step(latents: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """x' = x + (sigma' - sigma) v, accumulated in fp32 and cast back like the scheduler."""
    return (latents.float() + (sigma_next - sigma) * v.float()).to(v.dtype)


@torch.no_grad()
def euler_sample(
    transformer: Callable,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    text_ids: torch.Tensor,
    img_ids: torch.Tensor,
    sigmas: torch.Tensor,
    negative_embeds: torch.Tensor | None = None,
    negative_text_ids: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    batch_cfg: bool = True,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Integrate packed latents from sigmas[0] to sigmas[-1] (= 0). Returns packed clean latents."""
    sigmas = sigmas.to(latents.device)
    for i in range(len(sigmas) - 1):
        v = velocity(
            transformer, latents, sigmas[i], prompt_embeds, text_ids, img_ids,
            negative_embeds, negative_text_ids, guidance_scale, batch_cfg,
        )
        latents = euler_step(latents, v, sigmas[i], sigmas[i + 1])
        if on_step is not None:
            on_step(i, latents)
    return latents
