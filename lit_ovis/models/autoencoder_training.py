"""Train a small diffusers `AutoencoderKL` on a set of images, so CPU-scale runs get a latent space that
decodes to legible text (the released FLUX VAE is too large for a 2-core CPU, and a random one decodes noise).

The result is an ordinary diffusers VAE folder (`config.json` + safetensors): `build_vae(folder)`,
`--model.encoders.vae folder`, `lit-ovis prepare --vae folder`, and exports open it in `OvisImagePipeline`.
Its `scaling_factor` and `shift_factor` are measured on the training images after training
(`shift = mean`, `scale = 1 / std` of the encoder's latent means), so flow matching sees latents with zero
mean and unit variance, as it does with FLUX's VAE. `len(block_out_channels) - 1` halvings set the
downsampling factor (4 levels: 8x, FLUX's and the pipeline's default; 3 levels: 4x); the transformer then
needs `in_channels = 4 * latent_channels` and image sides divisible by 2 x the factor.

Cache: the folder holds `autoencoder.json` with a fingerprint of the settings and of the training images
(paths, sizes, modification times). `ensure_autoencoder` returns the folder as it is when the fingerprint
matches, and refuses to replace an autoencoder trained with other settings unless `overwrite` (latents
prepared with the old one would no longer decode). The folder is written in a temporary directory and
renamed into place, so a kill never leaves a half-written autoencoder.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from lit_ovis.errors import CheckpointError, ConfigError, DataError
from lit_ovis.files import atomic_write_json, temp_name

REPORT = "autoencoder.json"
FORMAT = 1  # bump when training code changes what the same settings produce


@dataclass
class AutoencoderConfig:
    block_out_channels: tuple[int, ...] = (16, 32, 64)
    """Channels of each encoder/decoder level; len - 1 halvings of the image side (3 levels = 4x, 4 levels = 8x).
    4x by default: at 8x a CPU-trainable autoencoder did not keep small words legible (see benchmarks/RESULTS.md)."""
    layers_per_block: int = 1
    """Residual blocks per encoder level (the decoder has one more, as in diffusers)."""
    latent_channels: int = 16
    """Latent channels; the transformer's in_channels must be 4x this (16 -> 64, FLUX's layout)."""
    norm_num_groups: int = 4
    """GroupNorm groups; must divide every entry of block_out_channels."""
    mid_block_add_attention: bool = True
    """Self-attention in the lowest-resolution block of encoder and decoder (as FLUX's VAE)."""
    steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 16
    """Images per step (one image size per batch)."""
    crop_size: int = 48
    """Train on random square crops of this side (a multiple of 2 x the downsampling factor, at most the smallest
    image side; 0: whole images). The autoencoder is convolutional, so crops cost less and it still codes whole images."""
    lr: float = 2e-3
    """Peak AdamW learning rate (linear warm-up, then cosine decay to lr_final_ratio x lr)."""
    lr_final_ratio: float = 0.05
    """Learning rate at the last step, as a fraction of lr."""
    warmup_steps: int = 100
    """Linear warm-up steps."""
    kl_weight: float = 1e-6
    """Weight of the KL term (keeps the latents near the origin; small, as in Stable Diffusion's VAEs)."""
    sample_posterior: bool = False
    """Decode samples of the posterior while training, as Stable Diffusion's VAEs do. Off: decode its mean (what
    `prepare` and the pipeline use); at init the posterior's std is 1, which drowns the latents and slows a short
    CPU training down badly."""
    edge_weight: float = 1.0
    """Weight of the L1 loss on horizontal/vertical image gradients (keeps glyph strokes sharp)."""
    seed: int = 0
    """Seed of the initial weights and the batch order."""
    stats_images: int = 512
    """Training images encoded after training to measure the latent mean/std (scaling and shift factors)."""
    threads: int = 0
    """torch CPU threads while training (0: leave torch's setting)."""

    def check(self) -> None:
        if len(self.block_out_channels) < 2:
            raise ConfigError("--block-out-channels needs at least 2 levels (one halving)")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ConfigError(f"--norm-num-groups {self.norm_num_groups} must divide every --block-out-channels {list(self.block_out_channels)}")
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError(f"--steps, --batch-size and --lr must be positive (got {self.steps}, {self.batch_size}, {self.lr})")
        if self.latent_channels < 1 or self.layers_per_block < 1:
            raise ConfigError("--latent-channels and --layers-per-block must be >= 1")
        if self.crop_size < 0 or self.crop_size % (2 * self.scale_factor):
            raise ConfigError(f"--crop-size must be 0 or a multiple of {2 * self.scale_factor} (got {self.crop_size})")

    @property
    def scale_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def diffusers_kwargs(self) -> dict:
        levels = len(self.block_out_channels)
        return dict(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block, latent_channels=self.latent_channels,
            norm_num_groups=self.norm_num_groups, mid_block_add_attention=self.mid_block_add_attention,
            use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.0, shift_factor=0.0, sample_size=64,
        )


# ------------------------------------------------------------------------------------------------- data
@dataclass
class ImageSet:
    """Images grouped by size, uint8 [N, 3, H, W] per group, plus the identity of the files they came from."""

    groups: list[torch.Tensor] = field(default_factory=list)
    identity: list = field(default_factory=list)

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups)


def load_manifest_images(manifest: str | Path, multiple: int, limit: int | None = None) -> ImageSet:
    """Images of a `lit-ovis prepare` manifest (JSONL/CSV with path, caption), centre-cropped to sides that are
    multiples of `multiple`, grouped by size. Unreadable images are skipped and counted on stderr."""
    from data_modules.records import load_image_grouped, records_from_manifest

    records = records_from_manifest(manifest)[:limit] if limit else records_from_manifest(manifest)
    grouped, skipped = load_image_grouped(records, multiple)
    by_size = {size: [pixels for _, pixels in items] for size, items in grouped.items()}
    kept = {id(record) for items in grouped.values() for record, _ in items}
    identity = []  # in manifest order: the autoencoder's cache fingerprint depends on it
    for record in records:
        if id(record) in kept:
            st = os.stat(record.path)
            identity.append([os.path.basename(record.path), st.st_size, st.st_mtime_ns])
    if skipped:
        print(f"{manifest}: skipped {skipped} unreadable or too small images", file=sys.stderr)
    if not by_size:
        raise DataError(f"{manifest}: no usable images; each row needs a readable 'path' (see lit-ovis prepare --manifest)")
    groups = [torch.from_numpy(np.stack(v)).permute(0, 3, 1, 2).contiguous() for _, v in sorted(by_size.items())]
    return ImageSet(groups, identity)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float in [-1, 1] (what the VAE reads and writes)."""
    return images.float() / 127.5 - 1.0


def batch_order(sizes: list[int], batch_size: int, steps: int, seed: int) -> list[tuple[int, list[int]]]:
    """`steps` batches of (group, indices): groups drawn in proportion to their size, indices shuffled per pass."""
    rng = random.Random(f"ae-{seed}")
    queues = [[] for _ in sizes]
    out = []
    for _ in range(steps):
        g = rng.choices(range(len(sizes)), weights=sizes)[0]
        take = []
        while len(take) < min(batch_size, sizes[g]):
            if not queues[g]:
                queues[g] = list(range(sizes[g]))
                rng.shuffle(queues[g])
            take.append(queues[g].pop())
        out.append((g, take))
    return out


def random_crops(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """One random `size` x `size` crop per image (the images themselves when size is 0 or not smaller)."""
    _, _, h, w = images.shape
    if not size or (size >= h and size >= w):
        return images
    ch, cw = min(size, h), min(size, w)
    tops = torch.randint(0, h - ch + 1, (len(images),), generator=generator).tolist()
    lefts = torch.randint(0, w - cw + 1, (len(images),), generator=generator).tolist()
    return torch.stack([im[:, t: t + ch, l: l + cw] for im, t, l in zip(images, tops, lefts)])


# ------------------------------------------------------------------------------------------------- loss
def image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, edge_weight: float) -> torch.Tensor:
    """L1 on pixels plus `edge_weight` x L1 on horizontal and vertical differences (stroke edges)."""
    loss = (recon - target).abs().mean()
    if edge_weight > 0:
        (rx, ry), (tx, ty) = image_gradients(recon), image_gradients(target)
        loss = loss + edge_weight * 0.5 * ((rx - tx).abs().mean() + (ry - ty).abs().mean())
    return loss


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) per latent element, averaged."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()


def lr_factor(step: int, steps: int, warmup: int, final_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# --------------------------------------------------------------------------------------------- training
def train_autoencoder(cfg: AutoencoderConfig, images: ImageSet, log: Callable[[str], None] | None = print,
                      log_every: int = 100) -> tuple[AutoencoderKL, dict]:
    """Train from scratch; returns the autoencoder (scaling/shift set from its latents) and a training report."""
    cfg.check()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        vae = AutoencoderKL(**cfg.diffusers_kwargs())
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        curve = _fit(vae, cfg, images, log, log_every)
    finally:
        torch.set_num_threads(threads)
    stats = latent_statistics(vae, images, cfg.stats_images, cfg.batch_size)
    vae.register_to_config(scaling_factor=stats["scaling_factor"], shift_factor=stats["shift_factor"])
    report = {"parameters": sum(p.numel() for p in vae.parameters()), "scale_factor": cfg.scale_factor,
              "train_images": len(images), "curve": curve, **stats}
    return vae.eval(), report


def _fit(vae: AutoencoderKL, cfg: AutoencoderConfig, images: ImageSet, log, log_every: int) -> list[dict]:
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.steps, cfg.warmup_steps, cfg.lr_final_ratio))
    gen = torch.Generator().manual_seed(cfg.seed)
    curve, window, start = [], [], time.perf_counter()
    for step, (g, idx) in enumerate(batch_order([len(x) for x in images.groups], cfg.batch_size, cfg.steps, cfg.seed)):
        x = to_unit_range(random_crops(images.groups[g][idx], cfg.crop_size, gen))
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen) if cfg.sample_posterior else dist.mean
        recon = vae.decode(z).sample
        rec = reconstruction_loss(recon, x, cfg.edge_weight)
        loss = rec + cfg.kl_weight * kl_loss(dist.mean, dist.logvar)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        window.append(float(rec.detach()))
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            entry = {"step": step + 1, "reconstruction_loss": round(sum(window) / len(window), 5),
                     "seconds": round(time.perf_counter() - start, 1)}
            curve.append(entry)
            window = []
            if log:
                log(f"autoencoder step {entry['step']}/{cfg.steps}  loss {entry['reconstruction_loss']:.4f}  {entry['seconds']:.0f} s")
    return curve


@torch.no_grad()
def latent_statistics(vae: AutoencoderKL, images: ImageSet, max_images: int, batch_size: int) -> dict:
    """Mean and std of the encoder's latent means over (up to) `max_images` images spread over all groups:
    shift_factor = mean, scaling_factor = 1 / std, so (z - shift) * scale has zero mean and unit variance."""
    vae.eval()
    total = len(images)
    per_group = [max(1, round(max_images * len(g) / total)) for g in images.groups]
    n, s, s2 = 0, 0.0, 0.0
    for g, k in zip(images.groups, per_group):
        picks = torch.linspace(0, len(g) - 1, min(k, len(g))).round().long()
        for i in range(0, len(picks), batch_size):
            z = vae.encode(to_unit_range(g[picks[i: i + batch_size]])).latent_dist.mean.double()
            n += z.numel()
            s += float(z.sum())
            s2 += float((z * z).sum())
    mean = s / n
    std = math.sqrt(max(s2 / n - mean * mean, 1e-12))
    return {"shift_factor": mean, "scaling_factor": 1.0 / std, "latent_mean": mean, "latent_std": std}


# ------------------------------------------------------------------------------------------------ cache
def fingerprint(cfg: AutoencoderConfig, images: ImageSet) -> str:
    settings = {k: v for k, v in asdict(cfg).items() if k != "threads"}  # threads change speed, not the result
    blob = json.dumps([FORMAT, settings, images.identity], sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_report(folder: str | Path) -> dict | None:
    try:
        return json.loads((Path(folder) / REPORT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def save_autoencoder(vae: AutoencoderKL, report: dict, folder: str | Path) -> Path:
    """Write the diffusers folder and its report next to `folder`, then rename it into place."""
    out = Path(folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        vae.save_pretrained(tmp, safe_serialization=True)
        atomic_write_json(tmp / REPORT, report)
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        raise CheckpointError(f"{out}: could not write the autoencoder ({err.strerror or err}); free disk space or choose another --output-dir") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure_autoencoder(cfg: AutoencoderConfig, manifest: str | Path, output_dir: str | Path, overwrite: bool = False,
                       log: Callable[[str], None] | None = print, log_every: int = 100) -> tuple[Path, dict]:
    """The autoencoder for (settings, training images) in `output_dir`: loaded from there when it was trained
    with exactly these, trained and written otherwise. Returns (folder, report)."""
    cfg.check()
    images = load_manifest_images(manifest, multiple=2 * cfg.scale_factor)
    fp = fingerprint(cfg, images)
    out = Path(output_dir)
    existing = read_report(out)
    if existing is not None and existing.get("fingerprint") == fp and (out / "config.json").exists():
        return out, {**existing, "trained_this_run": False}
    if out.exists() and any(out.iterdir()) and not overwrite:
        what = f"an autoencoder with other settings or images (fingerprint {existing.get('fingerprint')})" if existing else "other files"
        raise ConfigError(f"{out} holds {what}; pass --overwrite to replace it (latents prepared with the old one must then be "
                          f"prepared again) or choose another --output-dir")
    start, cpu_start = time.perf_counter(), time.process_time()
    vae, report = train_autoencoder(cfg, images, log, log_every)
    # Wall time depends on what else runs on the machine; CPU time of this process does much less.
    report = {"format": FORMAT, "fingerprint": fp, "config": asdict(cfg), "manifest": str(manifest),
              "train_seconds": round(time.perf_counter() - start, 1), "train_cpu_seconds": round(time.process_time() - cpu_start, 1),
              "torch_threads": cfg.threads or torch.get_num_threads(), **report}
    save_autoencoder(vae, report, out)
    return out, {**report, "trained_this_run": True}
