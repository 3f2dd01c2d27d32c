"""Backbone presets, loading errors, VAE packing/ids and the text encoder against diffusers."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_trainer
from diffusers import OvisImagePipeline, OvisImageTransformer2DModel
from safetensors.torch import save_file

from lit_ovis.errors import CheckpointError, ConfigError
from lit_ovis.models.backbone import build_backbone, count_parameters, load_backbone_weights
from lit_ovis.models.vae import latent_image_ids, latent_size, pack_latents, unpack_latents


def test_7b_preset_matches_released_architecture():
    ours = build_backbone("ovis-image-7b", device="meta")
    with torch.device("meta"):
        reference = OvisImageTransformer2DModel()  # diffusers defaults = the released model
    assert count_parameters(ours) == 7_370_449_728  # the report's 7.37B
    ours_sd, ref_sd = ours.state_dict(), reference.state_dict()
    assert list(ours_sd) == list(ref_sd)
    assert all(ours_sd[k].shape == ref_sd[k].shape for k in ref_sd)
    assert len(ours.transformer_blocks) == 6 and len(ours.single_transformer_blocks) == 27
    assert ours.config.num_attention_heads == 24 and ours.config.attention_head_dim == 128


def test_tiny_preset_is_small_and_deterministic():
    a, b = build_backbone("tiny"), build_backbone("tiny")
    assert 1_000_000 < count_parameters(a) < 5_000_000
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_unknown_preset_is_one_line_error():
    with pytest.raises(ConfigError, match="unknown backbone preset 'huge'.*choose one of"):
        build_backbone("huge")


def test_weight_loading_round_trip_and_errors(tmp_path, tiny_backbone):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_backbone.state_dict().items()}, str(path))
    fresh = build_backbone("tiny", pretrained=str(path))
    assert all(torch.equal(x, y) for x, y in zip(fresh.state_dict().values(), tiny_backbone.state_dict().values()))

    with pytest.raises(CheckpointError, match="not found"):
        build_backbone("tiny", pretrained=str(tmp_path / "missing.safetensors"))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        build_backbone("tiny", pretrained=str(corrupt))
    partial = tmp_path / "partial.safetensors"
    sd = {k: v.contiguous() for k, v in tiny_backbone.state_dict().items() if not k.startswith("proj_out")}
    sd["extra.weight"] = torch.zeros(1)
    save_file(sd, str(partial))
    with pytest.raises(CheckpointError, match=r"2 missing keys .*proj_out.*1 unexpected keys"):
        load_backbone_weights(build_backbone("tiny"), str(partial))


def test_folder_with_missing_keys_is_refused_not_random_initialised(tmp_path, tiny_backbone):
    from safetensors.torch import load_file

    tiny_backbone.save_pretrained(tmp_path / "ok")
    fresh = build_backbone("tiny", pretrained=str(tmp_path / "ok"))
    assert all(torch.equal(x, y) for x, y in zip(fresh.state_dict().values(), tiny_backbone.state_dict().values()))
    bad = tmp_path / "bad"
    tiny_backbone.save_pretrained(bad)
    sd = load_file(str(bad / "diffusion_pytorch_model.safetensors"))
    sd.pop("proj_out.weight")
    save_file(sd, str(bad / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 missing .*proj_out\.weight") as err:
        build_backbone("tiny", pretrained=str(bad))
    assert "\n" not in str(err.value)


def test_training_checkpoint_initialises_the_next_stage(tmp_path):
    """`backbone.pretrained` may be a previous stage's .ckpt: EMA weights when that run sampled with them."""
    from helpers import LatentSet, loader, tiny_flow_module
    from lit_ovis.modules.config import EMAConfig

    module = tiny_flow_module(ema=EMAConfig(enabled=True, decay=0.5))
    trainer = tiny_trainer(3, default_root_dir=tmp_path)
    trainer.fit(module, loader(LatentSet(n=4)))
    trainer.save_checkpoint(tmp_path / "stage.ckpt")
    loaded = build_backbone("tiny", pretrained=str(tmp_path / "stage.ckpt"))
    ema = module.ema.shadow_state_dict()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, ema[name] if name in ema else module.backbone.state_dict()[name]), name
    raw = dict(module.backbone.named_parameters())
    assert any(not torch.equal(loaded.state_dict()[n], raw[n]) for n in ema)  # really the EMA, not the raw weights


def test_pack_unpack_and_ids_match_pipeline():
    z = torch.randn(2, 16, 6, 10)
    packed = pack_latents(z)
    assert torch.equal(packed, OvisImagePipeline._pack_latents(z, 2, 16, 6, 10))
    assert torch.equal(unpack_latents(packed, 6, 10), z)
    assert torch.equal(unpack_latents(packed, 6, 10), OvisImagePipeline._unpack_latents(packed, 48, 80, 8))
    assert torch.equal(latent_image_ids(6, 10), OvisImagePipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32))
    assert latent_size(1024, 768) == (128, 96)


def test_vae_round_trip_shapes(tiny_vae):
    images = torch.rand(2, 3, 64, 32) * 2 - 1
    z = tiny_vae.encode(images)
    assert z.shape == (2, 16, 8, 4)
    raw = tiny_vae.vae.encode(images).latent_dist.mode()
    torch.testing.assert_close(z, (raw - 0.1159) * 0.3611)  # FLUX shift then scale
    assert tiny_vae.decode(z).shape == images.shape
    assert not any(p.requires_grad for p in tiny_vae.parameters())


@pytest.mark.parametrize("prompts", [['A sign that says "OPEN"'], ['海报上写着"你好世界"', "", "a cat"]])
def test_text_encoder_equals_pipeline_encode_prompt(prompts, tiny_text_encoder, tiny_pipeline):
    ref, neg, ref_ids, _ = tiny_pipeline.encode_prompt(prompts, negative_prompt="", device="cpu", max_sequence_length=32)
    ours = tiny_text_encoder.encode(prompts)
    assert ours.shape == ref.shape == (len(prompts), 32, 32)
    assert torch.equal(ours, ref)
    assert torch.equal(tiny_text_encoder.encode([""] * len(prompts)), neg)
    from lit_ovis.models.text_encoder import text_ids

    assert torch.equal(text_ids(32), ref_ids)
