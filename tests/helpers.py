"""Test helpers: tiny in-memory latent datasets and module factories."""

from __future__ import annotations

import contextlib

import torch
from torch.utils.data import DataLoader, Dataset


class LatentSet(Dataset):
    """`n` fixed latent/embedding pairs, structured (not white noise) so a model can fit them."""

    def __init__(self, n: int = 4, latent_hw: tuple[int, int] = (4, 4), seq_len: int = 8, dim: int = 32, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        h, w = latent_hw
        base = torch.randn(n, 16, 1, 1, generator=g)
        ramp = torch.linspace(-1, 1, h * w).reshape(1, 1, h, w)
        self.latents = base * ramp + 0.1 * torch.randn(n, 16, h, w, generator=g)
        self.embeds = torch.randn(n, seq_len, dim, generator=g)
        self.captions = [f"sample {i}" for i in range(n)]

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int):
        return {"latents": self.latents[i], "prompt_embeds": self.embeds[i], "captions": self.captions[i], "ids": i}


def loader(ds: Dataset, batch_size: int = 4, shuffle: bool = False) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=0)


def tiny_flow_module(**overrides):
    from lit_ovis.modules.config import EncoderConfig, FlowConfig, OptimizerConfig
    from lit_ovis.modules.flow_matching import FlowMatchingModule
    from lit_ovis.sampling.generate import SamplingConfig

    kwargs = dict(
        encoders=EncoderConfig(max_sequence_length=8),
        optimizer=OptimizerConfig(lr=2e-3, warmup_steps=5),
        sampling=SamplingConfig(steps=4, guidance_scale=3.0, height=32, width=32),
        flow_matching=FlowConfig(caption_dropout=0.0, timestep_shift="none"),
    )
    kwargs.update(overrides)
    module = FlowMatchingModule(**kwargs)
    module.configure_model()
    return module


@contextlib.contextmanager
def mounted_tmpfs(path, size: str):
    """A real, small file system at `path` that fills up (full-disk tests); skips where mounting is not allowed."""
    import subprocess

    import pytest

    path.mkdir(exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)
