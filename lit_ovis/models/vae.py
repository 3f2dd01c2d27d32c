"""Frozen FLUX.1 16-channel VAE, latent normalisation, 2x2 packing and the 3-axis position ids.

Conventions follow diffusers' `OvisImagePipeline` exactly, so latents prepared here feed the pipeline and
the other way round. The pipeline derives the VAE's downsampling factor from its config
(`2 ** (len(block_out_channels) - 1)`: 8 for FLUX's VAE, 4 for a 3-level one such as the CPU-scale autoencoder
of `lit_ovis.models.autoencoder_training`) and the latent channels from the transformer (`in_channels // 4`);
so do `latent_size` and `FluxVAE.scale_factor` here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch import nn

from lit_ovis.errors import CheckpointError
from lit_ovis.files import check_weights_source, hub_load_failure
from lit_ovis.models.presets import TINY_SEED, VAE_PRESETS

VAE_SCALE = 8  # pixels per latent cell of FLUX's VAE (the default wherever no VAE is at hand)
LATENT_CHANNELS = 16
PATCH = 2  # latents are packed in 2x2 patches -> image sides must be multiples of 16


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/2)*(w/2), C*4] (2x2 patches, channel-major inside a patch)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, latent_h: int, latent_w: int) -> torch.Tensor:
    """Inverse of `pack_latents` for latent sides (h, w)."""
    b, _, ch = packed.shape
    x = packed.view(b, latent_h // 2, latent_w // 2, ch // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, ch // 4, latent_h, latent_w)


def latent_image_ids(latent_h: int, latent_w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Position ids [(h/2)*(w/2), 3] = (0, row, col) of each packed token, as the pipeline builds them. Built on
    `device` directly: a host->device copy of them would wait for the GPU every training step."""
    h, w = latent_h // 2, latent_w // 2
    rows = torch.arange(h, device=device)[:, None].expand(h, w).reshape(-1)
    cols = torch.arange(w, device=device)[None, :].expand(h, w).reshape(-1)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).to(dtype)


def latent_size(height: int, width: int, scale: int = VAE_SCALE) -> tuple[int, int]:
    """Latent sides for an image size and VAE downsampling factor, rounded down like the pipeline does."""
    return 2 * (height // (scale * PATCH)), 2 * (width // (scale * PATCH))


def scale_factor_of(config) -> int:
    """The pipeline's `vae_scale_factor` for an AutoencoderKL config (dict or FrozenDict)."""
    return 2 ** (len(config["block_out_channels"]) - 1)


class FluxVAE(nn.Module):
    """Frozen AutoencoderKL with the FLUX scaling/shift applied on both sides."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        return float(self.vae.config.shift_factor or 0.0)

    @property
    def scale_factor(self) -> int:
        """Pixels per latent cell (the pipeline's `vae_scale_factor`)."""
        return scale_factor_of(self.vae.config)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1], [B, 3, H, W] -> normalised latents [B, C, H/s, W/s] (mode unless `sample`)."""
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        return (z - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images in [-1, 1]."""
        z = latents.to(self.vae.dtype) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z, return_dict=False)[0]

    def train(self, mode: bool = True):  # frozen: always eval
        return super().train(False)


def build_vae(source: str = "tiny", dtype: torch.dtype = torch.float32) -> FluxVAE:
    """`source`: a preset name (`tiny`, `flux` random init), a diffusers folder (with or without `vae/`) or a hub id."""
    if source in VAE_PRESETS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            vae = AutoencoderKL(**VAE_PRESETS[source])
        return FluxVAE(vae if dtype == torch.float32 else vae.to(dtype))
    path = Path(source)
    local = check_weights_source(source, "VAE")
    subfolder = "vae" if (path / "vae").is_dir() or not local else None
    try:
        vae = AutoencoderKL.from_pretrained(source, subfolder=subfolder, torch_dtype=dtype)
    except OSError as err:
        raise CheckpointError(
            f"{source}: could not load the VAE ({hub_load_failure(source, err)}); set --model.encoders.vae to a preset "
            f"({sorted(VAE_PRESETS)}), a local diffusers folder or a cached hub id"
        ) from None
    return FluxVAE(vae)
