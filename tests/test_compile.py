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


def test_regional_compile_handles_many_bucket_shapes_without_falling_back():
    """Multi-resolution buckets: more shapes than dynamo's recompile limit (8) must neither fail nor fall
    back to eager; one static graph per block type while the shape stays the same."""
    import torch._dynamo
    from diffusers import OvisImageTransformer2DModel
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = OvisImageTransformer2DModel(in_channels=64, out_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))
    previous = torch._dynamo.config.recompile_limit
    torch._dynamo.reset()
    counters.clear()
    try:
        apply_compile(model, backend="eager")  # dynamo's guards and recompiles are the same for every backend
        shapes = [(4, 4), (4, 4), (4, 8), (8, 8), (8, 4), (8, 12), (12, 8), (12, 12), (4, 12), (16, 4), (16, 8)]
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True), torch.no_grad():
            for i, (h, w) in enumerate(shapes):
                model(hidden_states=torch.randn(1, h * w // 4, 64), encoder_hidden_states=torch.randn(1, 8, 32), timestep=torch.tensor([0.5]),
                      img_ids=latent_image_ids(h, w), txt_ids=text_ids(8), return_dict=False)
                if i == 1:
                    assert counters["stats"]["unique_graphs"] == 2  # same shape twice: no recompile
        # static shapes would need a graph per shape and block type (2 x 9); dynamic ones need a few
        assert counters["stats"]["unique_graphs"] <= 6
    finally:
        torch._dynamo.config.recompile_limit = previous
        torch._dynamo.reset()


def test_without_a_mesh_levers_apply_and_bf16_runs_under_autocast():
    class Holder:
        backbone = build_backbone("tiny")

    parallelize_module(Holder, None, ParallelConfig(param_dtype="bf16", activation_checkpointing="full"))
    assert all(getattr(b, "_lit_ovis_checkpointed", False) for b in list(Holder.backbone.transformer_blocks))
    out = _forward(Holder.backbone)
    assert out.dtype == torch.bfloat16  # computed in bf16 ...
    assert all(p.dtype == torch.float32 for p in Holder.backbone.parameters())  # ... on fp32 master weights
    torch.testing.assert_close(out.float(), _forward(build_backbone("tiny")).detach(), atol=0.05, rtol=0.05)


def test_classic_fsdp_skips_our_checkpointing_compile_and_dtype_with_a_warning():
    from types import SimpleNamespace

    from lit_ovis.parallel.strategy import OvisFSDPStrategy

    class Holder:
        backbone = build_backbone("tiny")
        _trainer = SimpleNamespace(strategy=OvisFSDPStrategy())

    cfg = ParallelConfig(param_dtype="bf16", activation_checkpointing="full", compile=True)
    with pytest.warns(UserWarning, match="activation_checkpointing=full, compile=True, param_dtype=bf16 ignored under the classic FSDPStrategy"):
        parallelize_module(Holder, None, cfg)
    blocks = list(Holder.backbone.transformer_blocks) + list(Holder.backbone.single_transformer_blocks)
    assert not any(getattr(b, "_lit_ovis_checkpointed", False) or b._compiled_call_impl is not None for b in blocks)
    assert getattr(Holder.backbone, "_lit_ovis_autocast", None) is None
