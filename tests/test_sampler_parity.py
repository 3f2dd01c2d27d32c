"""Our Euler/CFG sampler reproduces diffusers' OvisImagePipeline on the same tiny weights and noise."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from lit_ovis.models.vae import pack_latents
from lit_ovis.sampling.generate import SamplingConfig, generate_images, generate_latents, initial_noise
from lit_ovis.sampling.ode import sigma_schedule


@pytest.mark.parametrize("steps,seq_len", [(8, 16), (50, 4096), (28, 1024)])
def test_sigma_schedule_equals_scheduler(steps, seq_len):
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    from diffusers.pipelines.ovis_image.pipeline_ovis_image import calculate_shift

    import numpy as np

    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(seq_len))
    torch.testing.assert_close(sigma_schedule(steps, seq_len), sched.sigmas, atol=1e-6, rtol=0)


@pytest.mark.parametrize("batch_cfg", [True, False])
@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_latents_match_pipeline(batch_cfg, guidance, tiny_backbone, tiny_text_encoder, tiny_pipeline):
    prompts = ['a poster that says "SALE"', '招牌上写着"咖啡"']
    height, width = 64, 96
    ref = tiny_pipeline(
        prompts, negative_prompt="", guidance_scale=guidance, height=height, width=width,
        num_inference_steps=6, generator=torch.Generator().manual_seed(3), output_type="latent",
        max_sequence_length=32,
    ).images
    noise = initial_noise(2, height, width, torch.Generator().manual_seed(3))
    cfg = SamplingConfig(steps=6, guidance_scale=guidance, batch_cfg=batch_cfg)
    negative = tiny_text_encoder.encode(["", ""]) if guidance > 1 else None
    ours = generate_latents(tiny_backbone, tiny_text_encoder.encode(prompts), negative, height, width, cfg, noise=noise)
    assert ours.shape == (2, 16, 8, 12)
    assert (pack_latents(ours) - ref).abs().max().item() < 1e-4


def test_images_match_pipeline(tiny_backbone, tiny_text_encoder, tiny_vae, tiny_pipeline):
    prompt = ['a label reading "TEA"']
    ref = tiny_pipeline(
        prompt, height=32, width=32, num_inference_steps=4, guidance_scale=4.0,
        generator=torch.Generator().manual_seed(11), output_type="pt", max_sequence_length=32,
    ).images
    ours = generate_images(tiny_backbone, tiny_text_encoder, tiny_vae, prompt, SamplingConfig(steps=4, guidance_scale=4.0), seed=11, height=32, width=32)
    assert ours.shape == ref.shape == (1, 3, 32, 32)
    assert (ours - ref).abs().max().item() < 1e-4
