"""The architecture FLOP model equals torch's FlopCounterMode on the real diffusers module."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lit_ovis.models.backbone import build_backbone
from lit_ovis.models.presets import TRANSFORMER_PRESETS
from lit_ovis.parallel.flops import forward_flops, train_flops


@pytest.mark.parametrize("hw,text", [((4, 4), 8), ((8, 12), 20)])
def test_forward_flops_match_flop_counter(hw, text):
    model = build_backbone("tiny")
    cfg = TRANSFORMER_PRESETS["tiny"]
    h, w = hw
    ni = (h // 2) * (w // 2)
    from lit_ovis.models.text_encoder import text_ids
    from lit_ovis.models.vae import latent_image_ids

    inputs = dict(hidden_states=torch.randn(1, ni, 64), encoder_hidden_states=torch.randn(1, text, 32), timestep=torch.tensor([0.5]),
                  img_ids=latent_image_ids(h, w), txt_ids=text_ids(text), return_dict=False)
    # The math SDPA kernel decomposes attention into bmm's that the counter sees (CPU flash SDPA is not counted).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**inputs)
    assert forward_flops(cfg, ni, text) == counter.get_total_flops()


def test_train_flops_match_flop_counter_with_backward():
    model = build_backbone("tiny")
    cfg = TRANSFORMER_PRESETS["tiny"]
    from lit_ovis.models.text_encoder import text_ids
    from lit_ovis.models.vae import latent_image_ids

    x = torch.randn(2, 4, 64, requires_grad=True)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(hidden_states=x, encoder_hidden_states=torch.randn(2, 6, 32), timestep=torch.tensor([0.5, 0.2]),
                    img_ids=latent_image_ids(4, 4), txt_ids=text_ids(6), return_dict=False)[0]
        out.sum().backward()
    # backward is 2x forward for matmuls; the counter also counts the input-gradient of the first layer
    expected = 2 * train_flops(cfg, 4, 6)
    assert abs(counter.get_total_flops() - expected) / expected < 0.02


def test_7b_flops_per_image_at_1024():
    cfg = TRANSFORMER_PRESETS["ovis-image-7b"]
    tflops = forward_flops(cfg, 4096, 256) / 1e12
    # below 2 * 7.37e9 * 4352 = 64 TFLOP because double-stream weights each see only their own stream
    assert 45 < tflops < 64
