"""Checks that fail in seconds, with a one-line message naming the option and the fix, before any model
is built or any GPU work starts."""

from __future__ import annotations

import os
from typing import Any, Mapping

from lit_ovis.errors import ConfigError
from lit_ovis.models.presets import TRANSFORMER_PRESETS

REMOTE_PREFIXES = ("s3://", "gs://", "gcs://", "az://", "abfs://", "hf://", "http://", "https://", "local:")


def _get(cfg: Any, dotted: str, default=None):
    node = cfg
    for part in dotted.split("."):
        if node is None:
            return default
        if isinstance(node, Mapping) or hasattr(node, "get"):
            try:
                node = node.get(part, None)
            except TypeError:
                node = getattr(node, part, None)
        else:
            node = getattr(node, part, None)
    return default if node is None else node


def check_resolution(height: int, width: int, option: str) -> None:
    if height % 16 or width % 16:
        raise ConfigError(f"{option}: {height}x{width} is not a multiple of 16 px (VAE /8 then 2x2 patches); use e.g. {height // 16 * 16}x{width // 16 * 16}")


def check_config(cfg: Any) -> None:
    """`cfg`: the parsed LightningCLI sub-command config (namespace or dict)."""
    args = _get(cfg, "model.init_args") or {}
    preset = _get(args, "backbone.preset")
    if preset is not None and preset not in TRANSFORMER_PRESETS and not _get(args, "backbone.pretrained"):
        raise ConfigError(f"--model.backbone.preset: unknown preset '{preset}'; choose one of {sorted(TRANSFORMER_PRESETS)}")
    lr = _get(args, "optimizer.lr")
    if lr is not None and float(lr) <= 0:
        raise ConfigError(f"--model.optimizer.lr must be > 0 (got {lr})")
    height, width = _get(args, "sampling.height"), _get(args, "sampling.width")
    if height is not None and width is not None:
        check_resolution(int(height), int(width), "--model.sampling.height/width")

    data = _get(cfg, "data.init_args") or {}
    # Data modules that build a synthetic set on first use create their root themselves.
    builds_own = any(_get(data, k) for k in ("synthetic_samples", "synthetic_pairs", "synthetic_prompts"))
    for key in ("root", "data_dir", "path", "prompt_file"):
        path = _get(data, key)
        if isinstance(path, str) and path and not path.startswith(REMOTE_PREFIXES) and not builds_own:
            if not os.path.exists(path):
                raise ConfigError(f"--data.{key}: '{path}' does not exist; run `lit-ovis prepare` first or fix the path")
    resolution = _get(data, "resolution")
    if resolution is not None and int(resolution) % 16:
        raise ConfigError(f"--data.resolution: {resolution} is not a multiple of 16 px; use {int(resolution) // 16 * 16}")

    trainer = _get(cfg, "trainer") or {}
    devices = _get(trainer, "devices")
    nodes = int(_get(trainer, "num_nodes", 1) or 1)
    replicate = _get(args, "parallel.data_parallel_replicate")
    batch = _get(data, "batch_size")
    if isinstance(devices, int) and devices > 0:
        world = devices * nodes
        if replicate is not None and int(replicate) > 1 and world % int(replicate):
            raise ConfigError(
                f"--model.parallel.data_parallel_replicate={replicate} does not divide world size {world} "
                f"(trainer.num_nodes={nodes} x trainer.devices={devices}); set it to the number of nodes"
            )
        global_batch = _get(data, "global_batch_size")
        if global_batch is not None and int(global_batch) % world:
            raise ConfigError(f"--data.global_batch_size={global_batch} is not divisible by the {world} ranks; use a multiple of {world}")
    if batch is not None and int(batch) <= 0:
        raise ConfigError(f"--data.batch_size must be >= 1 (got {batch})")
