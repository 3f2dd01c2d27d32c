"""Named architecture presets: the released Ovis-Image-7B and a tiny one for tests and the CPU demo.

Code defaults equal the `ovis-image-7b` preset (diffusers' `OvisImageTransformer2DModel` defaults); the
`tiny` preset keeps every structural feature (double + single stream blocks, 3-axis RoPE, 16-channel VAE,
Qwen3 text encoder) at a size that trains on a laptop CPU in minutes.
"""

from __future__ import annotations

from lit_ovis.errors import ConfigError

# Transformer (MMDiT) presets, as keyword arguments of OvisImageTransformer2DModel.
TRANSFORMER_PRESETS: dict[str, dict] = {
    "ovis-image-7b": dict(
        patch_size=1,
        in_channels=64,
        out_channels=64,
        num_layers=6,
        num_single_layers=27,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=2048,
        axes_dims_rope=(16, 56, 56),
    ),
    "tiny": dict(
        patch_size=1,
        in_channels=64,
        out_channels=64,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=32,
        axes_dims_rope=(8, 12, 12),
    ),
}

# FLUX.1 16-channel AutoencoderKL (frozen). `flux` matches the released VAE's config.
VAE_PRESETS: dict[str, dict] = {
    "flux": dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=16,
        norm_num_groups=32,
        sample_size=1024,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ),
    "tiny": dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 16, 16),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ),
}

# Qwen3 text encoder (the LLM of Ovis2.5-2B, i.e. Qwen3-1.7B) and a tiny random one.
TEXT_ENCODER_PRESETS: dict[str, dict] = {
    "ovis2.5-2b": dict(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
}

# Components that belong together: preset name of the whole model -> component presets.
MODEL_PRESETS: dict[str, dict[str, str]] = {
    "ovis-image-7b": {"transformer": "ovis-image-7b", "vae": "flux", "text_encoder": "ovis2.5-2b"},
    "tiny": {"transformer": "tiny", "vae": "tiny", "text_encoder": "tiny"},
}

# Weights for tiny random components are drawn from this seed, so every process and every run builds
# the same "tiny" model (the demo's prepared latents stay valid across runs).
TINY_SEED = 1234


def lookup(table: dict[str, dict], name: str, what: str) -> dict:
    if name not in table:
        raise ConfigError(f"unknown {what} preset '{name}': choose one of {sorted(table)} or pass a local path / hub id")
    return dict(table[name])
