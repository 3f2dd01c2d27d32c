"""The one backbone: diffusers' `OvisImageTransformer2DModel`, built from a preset or loaded from weights.

We never fork the model: speed-ups (FSDP2, compile, checkpointing, attention backends) wrap it in
`lit_ovis.parallel`, so released weights load key for key and exports open in `OvisImagePipeline`.

Architecture: weights that carry one decide it — a training checkpoint (the architecture its run trained,
saved by every stage module), a diffusers folder or hub id (its config.json) — and the preset names it only
for a random init or a bare `.safetensors` file. So a run started from a custom-shaped folder exports, evals,
makes pairs and starts the next stage without anyone naming a preset.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import OvisImageTransformer2DModel

from lit_ovis.checkpoints import (
    backbone_state_dict, config_section, is_training_checkpoint, load_training_checkpoint, read_meta, stored_architecture,
)
from lit_ovis.errors import CheckpointError
from lit_ovis.files import check_weights_source, hub_load_failure
from lit_ovis.models.presets import TINY_SEED, TRANSFORMER_PRESETS, lookup

SAFETENSORS_SUFFIXES = (".safetensors",)


def backbone_config(preset: str) -> dict:
    return lookup(TRANSFORMER_PRESETS, preset, "backbone")


# ------------------------------------------------------------------------------------------ architecture
def architecture_of(model: OvisImageTransformer2DModel) -> dict[str, Any]:
    """The init arguments that rebuild `model`'s shape (its diffusers config without `_` bookkeeping keys)."""
    return normalised(dict(model.config))


def normalised(architecture: dict[str, Any]) -> dict[str, Any]:
    """Every init argument, defaults filled in and JSON lists as tuples, so two spellings of one shape compare equal."""
    params = inspect.signature(OvisImageTransformer2DModel.__init__).parameters
    full = {k: p.default for k, p in params.items() if k != "self" and p.default is not inspect.Parameter.empty}
    full.update({k: v for k, v in architecture.items() if k in params})
    return {k: tuple(v) if isinstance(v, list) else v for k, v in full.items()}


def describe_difference(a: dict[str, Any], b: dict[str, Any]) -> str:
    """`num_layers 2 vs 1, ...` for every init argument on which two architectures differ."""
    a, b = normalised(a), normalised(b)
    return ", ".join(f"{k} {a[k]} vs {b[k]}" for k in a if a[k] != b[k])


def folder_architecture(source: str) -> dict[str, Any]:
    """config.json of a diffusers folder (with or without `transformer/`) or a hub id."""
    local = check_weights_source(source, "backbone")
    subfolder = "transformer" if (Path(source) / "transformer").is_dir() or not local else None
    try:
        loaded = OvisImageTransformer2DModel.load_config(source, subfolder=subfolder)
    except OSError as err:
        raise CheckpointError(f"{source}: could not read the backbone config ({hub_load_failure(source, err)}); check the path") from None
    return normalised({k: v for k, v in loaded.items() if not k.startswith("_")})


def checkpoint_architecture(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The architecture a training checkpoint holds. Checkpoints written before it was saved: the one their
    run's backbone config gives (its pretrained folder's or training checkpoint's, else its preset)."""
    stored = stored_architecture(checkpoint)
    if stored is not None:
        return normalised(stored)
    from lit_ovis.modules.config import BackboneConfig  # config dataclasses only; no module code

    cfg = config_section(checkpoint, "backbone", BackboneConfig)
    try:
        return resolve_architecture(cfg.preset, cfg.pretrained)
    except CheckpointError:  # the earlier stage's weights are gone: the preset is all that is left
        return normalised(backbone_config(cfg.preset))


def resolve_architecture(preset: str, pretrained: str | None) -> dict[str, Any]:
    """The architecture `build_backbone(preset, pretrained)` builds, read without loading any weights."""
    pretrained = _none_if_null(pretrained)
    if pretrained and is_training_checkpoint(pretrained):
        return checkpoint_architecture(read_meta(pretrained))
    if pretrained and not _is_single_file(pretrained):
        return folder_architecture(pretrained)
    return normalised(backbone_config(preset))


def check_architecture(expected: dict[str, Any] | None, actual: dict[str, Any], source: str) -> None:
    """One line when the weights of `source` have another shape than the architecture asked for."""
    if expected is not None and normalised(expected) != normalised(actual):
        raise CheckpointError(f"{source}: its backbone has another architecture than this run's "
                              f"({describe_difference(actual, expected)}, its vs the run's); pass weights of the run's "
                              "architecture (those its checkpoint's run started from)")


def _none_if_null(value: str | None) -> str | None:
    return None if isinstance(value, str) and value.strip().lower() in ("", "none", "null") else value


def _random_backbone(architecture: dict[str, Any], device=None, dtype: torch.dtype = torch.float32) -> OvisImageTransformer2DModel:
    """A randomly initialised backbone (the same weights in every process, seeded), or a meta one."""
    if device is not None and str(device) == "meta":
        with torch.device("meta"):
            return _cast(OvisImageTransformer2DModel(**architecture), dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = OvisImageTransformer2DModel(**architecture)
    return _cast(model, dtype)


def backbone_from_checkpoint(
    checkpoint: dict[str, Any], use_ema: bool | None = None, source: str = "checkpoint", dtype: torch.dtype = torch.float32,
    lora_scale: float = 1.0,
) -> OvisImageTransformer2DModel:
    """The backbone of a loaded training checkpoint, in the architecture it was trained with; `use_ema=None`:
    the weights its run sampled with (a LoRA checkpoint: merged into its base at `lora_scale`). Used by export,
    eval, make-pairs, consolidate and the next stage."""
    model = _random_backbone(checkpoint_architecture(checkpoint), dtype=dtype)
    load_checked(model, backbone_state_dict(checkpoint, use_ema=use_ema, lora_scale=lora_scale), source)
    return model


def build_backbone(
    preset: str = "tiny",
    pretrained: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    architecture: dict[str, Any] | None = None,
) -> OvisImageTransformer2DModel:
    """Build the MMDiT; if `pretrained` is given, load its weights (and take its architecture).

    `pretrained` may be a lit-ovis training checkpoint (its run's architecture and sampled weights), a diffusers
    folder (with or without a `transformer/` subfolder), a single `.safetensors` file in diffusers key layout
    (shaped like `preset`), or a hub id (only with network access or a local cache). `architecture`: the shape
    the caller needs (a checkpoint about to be restored, the policy a DPO reference must match); it replaces
    `preset`, and weights of another shape are refused in one line. `device="meta"` builds without allocating
    memory (parameter counting, FSDP init).
    """
    pretrained = _none_if_null(pretrained)  # a command-line `null` that arrived as text
    if pretrained and is_training_checkpoint(pretrained):
        checkpoint = load_training_checkpoint(pretrained)
        check_architecture(architecture, checkpoint_architecture(checkpoint), pretrained)
        model = backbone_from_checkpoint(checkpoint, source=pretrained, dtype=dtype)
        return model if device is None else model.to(device)
    if pretrained and not _is_single_file(pretrained):
        model = _from_pretrained_folder(pretrained, dtype=dtype)
        check_architecture(architecture, architecture_of(model), pretrained)
        return model if device is None else model.to(device)
    model = _random_backbone(normalised(architecture) if architecture else backbone_config(preset), device, dtype)
    if pretrained:
        load_backbone_weights(model, pretrained)
    if device is not None and str(device) != "meta":
        model = model.to(device)
    return model


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    return model if dtype == torch.float32 else model.to(dtype)


def _is_single_file(path: str) -> bool:
    return path.endswith(SAFETENSORS_SUFFIXES) or path.endswith((".pt", ".pth", ".bin"))


def _from_pretrained_folder(path: str, dtype: torch.dtype) -> OvisImageTransformer2DModel:
    local = Path(path)
    subfolder = "transformer" if (local / "transformer").is_dir() else None
    is_hub_id = not check_weights_source(path, "backbone")
    if not is_hub_id and not (local / "config.json").exists() and subfolder is None:
        raise CheckpointError(
            f"{path}: not a diffusers model folder (no config.json or transformer/); pass a folder written by "
            "`lit-ovis export`, a .safetensors file, or a hub id such as AIDC-AI/Ovis-Image-7B"
        )
    try:
        model, info = OvisImageTransformer2DModel.from_pretrained(
            path, subfolder="transformer" if is_hub_id else subfolder, torch_dtype=dtype, output_loading_info=True
        )
    except OSError as err:
        raise CheckpointError(
            f"{path}: could not load the backbone ({hub_load_failure(path, err)}); check the path or download the "
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
    load_checked(model, read_state_dict(path), path)


def load_checked(model: OvisImageTransformer2DModel, state: dict[str, torch.Tensor], path: str, check_only: bool = False) -> None:
    """Strict load with one-line errors; `check_only=True` checks keys and shapes without copying (e.g. against a meta model)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the backbone architecture: {len(missing)} missing keys (e.g. {missing[:3]}), "
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


def backbone_skeleton(preset: str = "tiny", pretrained: str | None = None, architecture: dict[str, Any] | None = None) -> OvisImageTransformer2DModel:
    """The backbone on the meta device (no memory), shaped like `build_backbone(preset, pretrained)` (read from
    the weights' own config, nothing loaded): FSDP2 shards it first, then rank 0's weights fill the shards."""
    config = resolve_architecture(preset, pretrained)
    check_architecture(architecture, config, pretrained or f"preset '{preset}'")
    with torch.device("meta"):
        return OvisImageTransformer2DModel(**config)


def pretrained_state_dict(preset: str, pretrained: str) -> dict[str, torch.Tensor]:
    """The full, key-checked weights of `pretrained` on CPU (read by one rank, then broadcast to the shards)."""
    if is_training_checkpoint(pretrained):
        checkpoint = load_training_checkpoint(pretrained)
        state = backbone_state_dict(checkpoint, use_ema=None)
        with torch.device("meta"):
            skeleton = OvisImageTransformer2DModel(**checkpoint_architecture(checkpoint))
    elif _is_single_file(pretrained):
        state = read_state_dict(pretrained)
        skeleton = backbone_skeleton(preset)
    else:
        return _from_pretrained_folder(pretrained, dtype=torch.float32).state_dict()
    load_checked(skeleton, state, pretrained, check_only=True)
    return state


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
