"""The one backbone: diffusers' `OvisImageTransformer2DModel`, built from a preset or loaded from weights.

We never fork the model: speed-ups (FSDP2, compile, checkpointing, attention backends) wrap it in
`lit_ovis.parallel`, so released weights load key for key and exports open in `OvisImagePipeline`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import OvisImageTransformer2DModel

from lit_ovis.checkpoints import backbone_state_dict, is_training_checkpoint, sampled_weights
from lit_ovis.errors import CheckpointError
from lit_ovis.models.presets import TINY_SEED, TRANSFORMER_PRESETS, lookup

SAFETENSORS_SUFFIXES = (".safetensors",)


def backbone_config(preset: str) -> dict:
    return lookup(TRANSFORMER_PRESETS, preset, "backbone")


def build_backbone(
    preset: str = "tiny",
    pretrained: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> OvisImageTransformer2DModel:
    """Build the MMDiT from `preset`; if `pretrained` is given, load its weights.

    `pretrained` may be a diffusers folder (with or without a `transformer/` subfolder), a single
    `.safetensors` file in diffusers key layout, or a hub id (only when the user has network access or a
    local cache). `device="meta"` builds without allocating memory (parameter counting, FSDP init).
    """
    if isinstance(pretrained, str) and pretrained.strip().lower() in ("", "none", "null"):
        pretrained = None  # a command-line `null` that arrived as text
    if pretrained and is_training_checkpoint(pretrained):
        model = build_backbone(preset, None, device, dtype)
        _load_checked(model, sampled_weights(pretrained), pretrained)
        return model
    if pretrained and not _is_single_file(pretrained):
        return _from_pretrained_folder(pretrained, dtype=dtype)
    config = backbone_config(preset)
    if device is not None and str(device) == "meta":
        with torch.device("meta"):
            return _cast(OvisImageTransformer2DModel(**config), dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = OvisImageTransformer2DModel(**config)
    model = _cast(model, dtype)
    if pretrained:
        load_backbone_weights(model, pretrained)
    if device is not None:
        model = model.to(device)
    return model


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    return model if dtype == torch.float32 else model.to(dtype)


def _is_single_file(path: str) -> bool:
    return path.endswith(SAFETENSORS_SUFFIXES) or path.endswith((".pt", ".pth", ".bin"))


def _from_pretrained_folder(path: str, dtype: torch.dtype) -> OvisImageTransformer2DModel:
    local = Path(path)
    subfolder = "transformer" if (local / "transformer").is_dir() else None
    if local.exists() and not (local / "config.json").exists() and subfolder is None:
        raise CheckpointError(
            f"{path}: not a diffusers model folder (no config.json or transformer/); pass a folder written by "
            "`lit-ovis export`, a .safetensors file, or a hub id such as AIDC-AI/Ovis-Image-7B"
        )
    is_hub_id = not local.exists()
    try:
        model, info = OvisImageTransformer2DModel.from_pretrained(
            path, subfolder="transformer" if is_hub_id else subfolder, torch_dtype=dtype, output_loading_info=True
        )
    except OSError as err:
        raise CheckpointError(
            f"{path}: could not load the backbone ({str(err).splitlines()[0]}); check the path or download the "
            "weights first (no network access at run time)"
        ) from None
    # diffusers only warns about missing keys and leaves them randomly initialised: refuse instead.
    missing, unexpected = info.get("missing_keys") or [], info.get("unexpected_keys") or []
    mismatched = info.get("mismatched_keys") or []
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{path}: weights do not match the backbone config: {len(missing)} missing (e.g. {sorted(missing)[:3]}), "
            f"{len(unexpected)} unexpected, {len(mismatched)} wrong-shape keys; re-export the folder or pick the matching weights"
        )
    return model


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weight file; corrupt or missing files raise a one-line CheckpointError."""
    path = str(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: weight file not found; check the path (no download is attempted)")
    try:
        if path.endswith(SAFETENSORS_SUFFIXES):
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any decoding failure means a corrupt file
        raise CheckpointError(f"{path}: unreadable or corrupt weight file ({type(err).__name__}); re-export or re-download it") from None
    if isinstance(state, dict) and "state_dict" in state:  # a training checkpoint saved under another suffix
        state = backbone_state_dict(state)
    return state


def load_backbone_weights(model: OvisImageTransformer2DModel, path: str) -> None:
    """Load a diffusers-layout weight file strictly, reporting key mismatches in one line."""
    _load_checked(model, read_state_dict(path), path)


def _load_checked(model: OvisImageTransformer2DModel, state: dict[str, torch.Tensor], path: str, check_only: bool = False) -> None:
    """Strict load with one-line errors; `check_only=True` checks keys and shapes without copying (e.g. against a meta model)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the backbone preset: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]}); pick the preset the weights were trained with"
        )
    bad_shapes = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if bad_shapes:
        k = bad_shapes[0]
        raise CheckpointError(
            f"{path}: {len(bad_shapes)} tensors have the wrong shape (e.g. {k}: {tuple(state[k].shape)} vs "
            f"{tuple(expected[k].shape)}); pick the preset the weights were trained with"
        )
    if not check_only:
        model.load_state_dict(state, strict=True)


def backbone_skeleton(preset: str = "tiny", pretrained: str | None = None) -> OvisImageTransformer2DModel:
    """The backbone on the meta device (no memory), shaped like `pretrained` when it is a diffusers folder or
    hub id (its config.json), else like `preset`: FSDP2 shards it first, then rank 0's weights fill the shards."""
    config = backbone_config(preset)
    if pretrained and not is_training_checkpoint(pretrained) and not _is_single_file(pretrained):
        local = Path(pretrained)
        subfolder = "transformer" if (local / "transformer").is_dir() or not local.exists() else None
        try:
            loaded = OvisImageTransformer2DModel.load_config(pretrained, subfolder=subfolder)
        except OSError as err:
            raise CheckpointError(f"{pretrained}: could not read the backbone config ({str(err).splitlines()[0]}); check the path") from None
        config = {k: v for k, v in loaded.items() if not k.startswith("_")}
    with torch.device("meta"):
        return OvisImageTransformer2DModel(**config)


def pretrained_state_dict(preset: str, pretrained: str) -> dict[str, torch.Tensor]:
    """The full, key-checked weights of `pretrained` on CPU (read by one rank, then broadcast to the shards)."""
    if is_training_checkpoint(pretrained):
        state = sampled_weights(pretrained)
    elif _is_single_file(pretrained):
        state = read_state_dict(pretrained)
    else:
        return _from_pretrained_folder(pretrained, dtype=torch.float32).state_dict()
    _load_checked(backbone_skeleton(preset), state, pretrained, check_only=True)
    return state


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
