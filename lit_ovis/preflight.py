"""Checks that fail in seconds, with a one-line message naming the option and the fix, before any model
is built, any process is launched or any GPU work starts (the CLI runs them on the parsed config, and
`lit-ovis submit` runs them before calling sbatch).

Batch sizes here are per rank (every rank draws its own batches), so no batch size has to divide the
mesh; what must fit the world size (trainer.num_nodes x trainer.devices) is the mesh itself
(replicas x shards, data x tensor parallel) and the data: every rank needs at least one batch per epoch.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from lit_ovis.errors import ConfigError
from lit_ovis.models.presets import TRANSFORMER_PRESETS

REMOTE_PREFIXES = ("s3://", "gs://", "gcs://", "az://", "abfs://", "hf://", "http://", "https://", "local:")
# Paths a data module builds itself when asked for a synthetic set; the others must always exist.
BUILT_PATHS = ("root", "data_dir", "path")
USER_PATHS = ("prompt_file", "val_root")


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


def world_size(trainer: Any) -> int | None:
    """trainer.num_nodes x trainer.devices, or None when devices is left to auto-detection."""
    devices = _get(trainer, "devices")
    if isinstance(devices, str):
        devices = [d for d in devices.split(",") if d.strip()] if "," in devices else (int(devices) if devices.strip().isdigit() else None)
    if isinstance(devices, (list, tuple)):
        devices = len(devices)
    if not isinstance(devices, int) or devices <= 0:
        return None
    return devices * int(_get(trainer, "num_nodes", 1) or 1)


def _local_path_missing(path: Any) -> bool:
    return isinstance(path, str) and bool(path) and not path.startswith(REMOTE_PREFIXES) and not os.path.exists(path)


def check_model(args: Any) -> None:
    preset = _get(args, "backbone.preset")
    if preset is not None and preset not in TRANSFORMER_PRESETS and not _get(args, "backbone.pretrained"):
        raise ConfigError(f"--model.backbone.preset: unknown preset '{preset}'; choose one of {sorted(TRANSFORMER_PRESETS)}")
    lr = _get(args, "optimizer.lr")
    if lr is not None and float(lr) <= 0:
        raise ConfigError(f"--model.optimizer.lr must be > 0 (got {lr})")
    height, width = _get(args, "sampling.height"), _get(args, "sampling.width")
    if height is not None and width is not None:
        check_resolution(int(height), int(width), "--model.sampling.height/width")
    grpo = _get(args, "grpo")
    if grpo is not None:
        # GRPO slices rollouts and updates with these as range() steps: 0 would crash after the first rollout.
        for key in ("group_size", "rollout_batch_size", "train_batch_size", "inner_epochs", "optimizer_steps_per_epoch"):
            value = _get(grpo, key)
            if value is not None and int(value) < 1:
                raise ConfigError(f"--model.grpo.{key} must be >= 1 (got {value})")
        steps, cps = _get(grpo, "rollout_steps"), _get(grpo, "sampler", "cps") == "cps"
        if steps is not None and int(steps) < (2 if cps else 1):
            raise ConfigError(f"--model.grpo.rollout_steps must be >= {2 if cps else 1} (got {steps})"
                              + ("; the CPS step to t = 0 is deterministic and leaves nothing to train" if cps else ""))
        gh, gw = _get(grpo, "height"), _get(grpo, "width")
        if gh is not None and gw is not None:
            check_resolution(int(gh), int(gw), "--model.grpo.height/width")


def check_data(data: Any, world: int | None) -> None:
    synthetic = {k: int(_get(data, k, 0) or 0) for k in ("synthetic_samples", "synthetic_pairs")}
    if _get(data, "prompt_file") is not None or _get(data, "synthetic_prompts") is not None or _get(data, "zh_fraction") is not None:
        from data_modules.prompts import default_synthetic_prompts  # a PromptDataModule: its default depends on prompt_file

        synthetic["synthetic_prompts"] = default_synthetic_prompts(_get(data, "prompt_file"), _get(data, "synthetic_prompts"))
    builds_own = any(synthetic.values())
    for key in USER_PATHS + (() if builds_own else BUILT_PATHS):
        path = _get(data, key)
        if _local_path_missing(path):
            fix = "fix the path" if key in USER_PATHS else "run `lit-ovis prepare` first or fix the path"
            raise ConfigError(f"--data.{key}: '{path}' does not exist; {fix}")
    resolution = _get(data, "resolution")
    if resolution is not None and int(resolution) % 16:
        raise ConfigError(f"--data.resolution: {resolution} is not a multiple of 16 px; use {int(resolution) // 16 * 16}")
    batch = _get(data, "batch_size")
    if batch is not None and int(batch) <= 0:
        raise ConfigError(f"--data.batch_size must be >= 1 (got {batch})")
    if batch is None or world is None:
        return
    # A synthetic-only set has a known size: fewer samples than one batch per rank can never train.
    need = int(batch) * world
    for key, n in synthetic.items():
        only_source = key != "synthetic_prompts" or not _get(data, "prompt_file")
        if 0 < n < need and only_source:
            raise ConfigError(f"--data.{key}={n} is fewer than --data.batch_size={batch} x {world} ranks; use at least {need} or a smaller batch")


def check_mesh(cfg: Any, args: Any, world: int | None) -> None:
    if world is None:
        return
    strategy = _get(cfg, "trainer.strategy.init_args") or {}
    tp = _get(strategy, "tensor_parallel_size")
    dp = _get(strategy, "data_parallel_size")
    tp = int(tp) if isinstance(tp, int) or (isinstance(tp, str) and tp.isdigit()) else 1
    if tp > 1 and world % tp:
        raise ConfigError(f"--trainer.strategy.tensor_parallel_size={tp} does not divide world size {world}; use a divisor of it")
    if isinstance(dp, int) or (isinstance(dp, str) and dp.isdigit()):
        if int(dp) * tp != world:
            raise ConfigError(f"--trainer.strategy.data_parallel_size={dp} x tensor_parallel_size={tp} != world size {world}; set data_parallel_size to auto")
    data_parallel = world // tp
    replicate = _get(args, "parallel.data_parallel_replicate")
    if replicate is not None and int(replicate) < 1:
        raise ConfigError(f"--model.parallel.data_parallel_replicate must be >= 1 (got {replicate})")
    if replicate is not None and int(replicate) > 1 and data_parallel % int(replicate):
        nodes = int(_get(cfg, "trainer.num_nodes", 1) or 1)
        raise ConfigError(
            f"--model.parallel.data_parallel_replicate={replicate} does not divide world size {data_parallel} "
            f"(trainer.num_nodes={nodes} x trainer.devices={world // nodes}); set it to the number of nodes ({nodes})"
        )


def check_config(cfg: Any) -> None:
    """`cfg`: the parsed LightningCLI sub-command config (namespace or dict)."""
    args = _get(cfg, "model.init_args") or {}
    world = world_size(_get(cfg, "trainer") or {})
    check_model(args)
    check_data(_get(cfg, "data.init_args") or {}, world)
    check_mesh(cfg, args, world)
