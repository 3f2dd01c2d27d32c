"""Regional compilation and the attention-backend switch leave the model's outputs unchanged."""

from __future__ import annotations

import pytest
import torch

from lit_ovis.models.backbone import build_backbone
from lit_ovis.models.text_encoder import text_ids
from lit_ovis.models.vae import latent_image_ids
from lit_ovis.parallel.fsdp import ParallelConfig, apply_compile, parallelize_module


def _forward(model):
    g = torch.Generator().manual_seed(0)
    return model(hidden_states=torch.randn(1, 16, 64, generator=g), encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                 timestep=torch.tensor([0.4]), img_ids=latent_image_ids(8, 8), txt_ids=text_ids(8), return_dict=False)[0]


@pytest.mark.slow
def test_regional_compile_matches_eager():
    eager = build_backbone("tiny").eval()
    compiled = build_backbone("tiny").eval()
    apply_compile(compiled)
    with torch.no_grad():
        torch.testing.assert_close(_forward(compiled), _forward(eager), atol=1e-4, rtol=1e-4)


def test_attention_backend_switch_through_config():
    class Holder:
        backbone = build_backbone("tiny").eval()

    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    ref = _forward(build_backbone("tiny").eval())
    previous = _AttentionBackendRegistry._active_backend
    parallelize_module(Holder, None, ParallelConfig(attention_backend="_native_math"))
    try:
        with torch.no_grad():
            torch.testing.assert_close(_forward(Holder.backbone), ref.detach(), atol=1e-5, rtol=1e-5)
    finally:
        # diffusers also sets a process-wide active backend: undo both for the tests that follow
        Holder.backbone.reset_attention_backend()
        _AttentionBackendRegistry._active_backend = previous
