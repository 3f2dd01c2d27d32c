"""The one reader of training checkpoints: single-file Lightning `.ckpt` files and sharded (DCP) directories.

It owns the on-disk knowledge every reader needs: which paths are training checkpoints and whether they are
complete, the key prefixes (`backbone.`, `ema.`, DCP's `state_dict.`), reading only the backbone (and EMA) of
a sharded directory, and turning a checkpoint into backbone weights in diffusers key layout plus the module's
hyper-parameters and the backbone architecture it was trained with. Export, eval, consolidate, resume, the
CLI's `--ckpt_path` check and `backbone.pretrained` only call it, so none of them needs stage-specific code or
the DCP layout. (Writing is
`lit_ovis.checkpoint_io` and `lit_ovis.parallel.strategy`.)
"""

from __future__ import annotations

import dataclasses
import os
import typing
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from lit_ovis.errors import CheckpointError

BACKBONE_PREFIX = "backbone."
EMA_PREFIX = "ema."
# A sharded checkpoint is a DCP directory: `.metadata` (written last, so it marks a complete save), the
# shards, and rank 0's `meta.pt` (hyper-parameters, loop state); tensors are keyed `state_dict.<key>`.
SHARDED_METADATA = ".metadata"
SHARDED_META_FILE = "meta.pt"
DCP_STATE_PREFIX = "state_dict."
# The backbone's diffusers config (OvisImageTransformer2DModel's init arguments), saved by every stage module:
# readers build that architecture, whatever preset the run's config named (`lit_ovis.models.backbone`).
ARCHITECTURE_KEY = "backbone_architecture"

# A LoRA run's checkpoint holds only the adapter under `backbone.` (peft key layout) and says so in this entry:
# {"format": 1, "preset", "base" (the backbone.pretrained it applies to), "adapter_config" (peft LoraConfig dict)}.
LORA_ENTRY = "lora_adapter"

# `--weights` of export / eval: which backbone weights a training checkpoint gives (`backbone_state_dict`'s use_ema).
WEIGHTS = {"auto": None, "ema": True, "raw": False}


# ------------------------------------------------------------------------------------------ what a path is
def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """A DCP directory whose save finished (its `.metadata` exists)."""
    return (Path(path) / SHARDED_METADATA).is_file()


def is_training_checkpoint(path: str | os.PathLike) -> bool:
    """A Lightning `.ckpt` file or a sharded checkpoint directory (of this or a previous stage)."""
    return str(path).endswith(".ckpt") or is_sharded_checkpoint(path)


def is_complete(path: Path) -> bool:
    """A `.ckpt` file (atomically renamed into place) or a sharded directory with DCP metadata.
    `.X.old` (a complete sharded checkpoint moved aside during a swap) counts; temp files never do."""
    if ".tmp" in path.name or (path.name.startswith(".") and not path.name.endswith(".old")):
        return False
    if path.is_file():
        if path.suffix != ".ckpt":
            return False
        # torch.save writes a zip; a damaged file (a disk fault, a copy cut short) lacks its directory.
        # Reading the directory costs a seek, not a load.
        if not zipfile.is_zipfile(path):
            warnings.warn(f"skipping {path}: not a complete checkpoint (truncated or corrupt)", stacklevel=2)
            return False
        return True
    return path.is_dir() and is_sharded_checkpoint(path)


def check_readable(path: str | os.PathLike, option: str = "--ckpt_path") -> None:
    """Cheap checks before a run loads `path` (reads only a zip's directory, never the tensors)."""
    p = Path(path)
    fix = "pass an existing checkpoint, `last` to resume the newest one, or `null` to start fresh"
    if not p.exists():
        raise CheckpointError(f"{option}: '{path}' does not exist; {fix}")
    if p.is_dir():
        if not is_sharded_checkpoint(p):
            raise CheckpointError(f"{option}: '{path}' is a directory without sharded-checkpoint metadata ({SHARDED_METADATA}); {fix}")
        return
    if not zipfile.is_zipfile(p):
        raise CheckpointError(f"{option}: '{path}' is not a complete checkpoint (truncated or corrupt); {fix}")


# ------------------------------------------------------------------------------------------------ reading
def _load_file(path: Path) -> dict[str, Any]:
    try:
        # Lightning checkpoints hold the dataclass hyper-parameters, so a full unpickle is needed. Memory-mapped:
        # only the tensors used (the backbone, not the optimizer moments) are read from disk.
        try:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialization cannot be mapped
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any failure to decode means a corrupt or foreign file
        raise CheckpointError(f"{path}: unreadable or corrupt checkpoint ({type(err).__name__}); use an earlier checkpoint or re-run training") from None


def load_sharded_checkpoint(path: str | os.PathLike, ema: bool = True) -> dict[str, Any]:
    """Read the backbone (and with `ema` the EMA weights) of a Lightning ModelParallelStrategy checkpoint
    directory into one in-memory checkpoint dict, plus the small `meta.pt` (hyper-parameters, loops).

    Only those tensors are read: the state dict to load is built from the DCP metadata for the requested
    keys and `dcp.load` fills it, so the optimizer moments (2x the weights) never reach host memory.
    """
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise CheckpointError(f"{path}: not a complete sharded checkpoint (no {SHARDED_METADATA}); use an earlier checkpoint")
    reader = FileSystemReader(str(path))
    try:
        metadata = reader.read_metadata()
    except Exception as err:  # noqa: BLE001 - a truncated or foreign .metadata
        raise CheckpointError(f"{path}/{SHARDED_METADATA}: unreadable ({type(err).__name__}); use an earlier checkpoint") from None
    prefixes = tuple(DCP_STATE_PREFIX + p for p in ((BACKBONE_PREFIX, EMA_PREFIX) if ema else (BACKBONE_PREFIX,)))
    state_dict: dict[str, torch.Tensor] = {}
    for key, item in metadata.state_dict_metadata.items():
        if key.startswith(prefixes) and isinstance(item, TensorStorageMetadata):
            state_dict[key[len(DCP_STATE_PREFIX):]] = torch.empty(item.size, dtype=item.properties.dtype)
    if not state_dict:
        raise CheckpointError(f"{path}: holds no backbone weights (no '{DCP_STATE_PREFIX}{BACKBONE_PREFIX}' keys); is it a lit-ovis training checkpoint?")
    with warnings.catch_warnings():  # single-process loading is the intent here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        load({"state_dict": state_dict}, storage_reader=reader, no_dist=True)
    state: dict[str, Any] = {"state_dict": state_dict}
    meta = path / SHARDED_META_FILE
    if meta.exists():
        state.update(torch.load(meta, map_location="cpu", weights_only=False))
    return state


def load_training_checkpoint(path: str | os.PathLike, ema: bool = True) -> dict[str, Any]:
    """Load a `.ckpt` file or a sharded checkpoint directory into one in-memory checkpoint dict. From a
    sharded directory only the backbone (and with `ema` the EMA weights) is read, never optimizer state;
    pass `ema=False` when the EMA weights will not be used (halves the memory of a sharded load)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: checkpoint not found; pass a .ckpt file or a sharded checkpoint directory")
    if p.is_dir():
        return load_sharded_checkpoint(p, ema=ema)
    return _load_file(p)


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """A training checkpoint without its tensors: hyper-parameters, the backbone architecture, loop state. Cheap:
    a sharded directory's `meta.pt` alone, or a memory-mapped `.ckpt` whose tensors are never read."""
    p = Path(path)
    if p.is_dir():
        if not is_sharded_checkpoint(p):
            raise CheckpointError(f"{p}: not a complete sharded checkpoint (no {SHARDED_METADATA}); use an earlier checkpoint")
        meta = p / SHARDED_META_FILE
        return torch.load(meta, map_location="cpu", weights_only=False) if meta.exists() else {}
    checkpoint = load_training_checkpoint(p)
    return {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}


# ------------------------------------------------------------------------------------------ what it holds
def stored_architecture(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The backbone architecture the checkpoint's run trained (None in checkpoints written before it was saved)."""
    arch = checkpoint.get(ARCHITECTURE_KEY)
    return dict(arch) if isinstance(arch, dict) else None


def hyper_parameters(checkpoint: dict[str, Any]) -> dict[str, Any]:
    return dict(checkpoint.get("hyper_parameters") or {})


def config_section(checkpoint: dict[str, Any], key: str, cls):
    """The module's `key` config group (e.g. "backbone" -> BackboneConfig) as saved by `save_hyperparameters`:
    a dataclass, or a dict in checkpoints written through the CLI; the class default when it is absent."""
    value = hyper_parameters(checkpoint).get(key)
    return dataclass_from(cls, value) if isinstance(value, dict) else (value if value is not None else cls())


def dataclass_from(cls, values: dict[str, Any]):
    """A config dataclass from a (nested) dict, nested groups (e.g. GRPOConfig.rollout) built as their dataclasses."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            value = values[f.name]
            kwargs[f.name] = dataclass_from(hints[f.name], value) if dataclasses.is_dataclass(hints[f.name]) and isinstance(value, dict) else value
    return cls(**kwargs)


def uses_ema_weights(checkpoint: dict[str, Any]) -> bool:
    """True when the checkpoint holds EMA weights and its run sampled with them (`ema.use_for_sampling`)."""
    if not any(k.startswith(EMA_PREFIX) for k in checkpoint.get("state_dict") or {}):
        return False
    ema = hyper_parameters(checkpoint).get("ema")
    return bool(ema.get("use_for_sampling", True) if isinstance(ema, dict) else getattr(ema, "use_for_sampling", True))


def lora_entry(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The LoRA entry of a LoRA run's checkpoint (`LORA_ENTRY`), None for full fine-tuning."""
    entry = checkpoint.get(LORA_ENTRY)
    return entry if isinstance(entry, dict) else None


def adapter_state_dict(checkpoint: dict[str, Any], use_ema: bool | None = False) -> dict[str, torch.Tensor]:
    """A LoRA checkpoint's adapter in `save_lora_adapter` key layout (`<layer>.lora_A.weight`); `use_ema=None`:
    the weights the run sampled with."""
    from lit_ovis.models.lora import adapter_weights

    if lora_entry(checkpoint) is None:
        raise CheckpointError("checkpoint holds full backbone weights, not a LoRA adapter (it was not trained with --model.lora.enabled true)")
    return adapter_weights(_module_weights(checkpoint, use_ema))


def backbone_state_dict(checkpoint: dict[str, Any], use_ema: bool | None = False, lora_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Backbone weights in diffusers key layout; `use_ema=None`: the weights the run sampled its grids with
    (the EMA weights when it kept and used an EMA), which is what export, eval and the next stage start from.
    A LoRA checkpoint gives its base weights with the adapter merged in at `lora_scale` (the base is read
    from the `backbone.pretrained` the run recorded)."""
    entry = lora_entry(checkpoint)
    if entry is not None:
        from lit_ovis.models.lora import merged_base_weights

        return merged_base_weights(entry, adapter_state_dict(checkpoint, use_ema), lora_scale)
    return _module_weights(checkpoint, use_ema)


def _module_weights(checkpoint: dict[str, Any], use_ema: bool | None) -> dict[str, torch.Tensor]:
    """The `backbone.` tensors of a checkpoint with their prefix stripped, EMA values swapped in when asked."""
    if use_ema is None:
        use_ema = uses_ema_weights(checkpoint)
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError("checkpoint has no 'state_dict'; is it a lit-ovis training checkpoint?")
    weights = {k[len(BACKBONE_PREFIX):]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
    if not weights:
        raise CheckpointError(f"checkpoint holds no backbone weights (no '{BACKBONE_PREFIX}' keys); is it a lit-ovis training checkpoint?")
    if use_ema:
        ema = {k[len(EMA_PREFIX):].replace("__", "."): v for k, v in state.items() if k.startswith(EMA_PREFIX)}
        if not ema:
            raise CheckpointError("--use_ema was given but the checkpoint has no EMA weights (train with --model.ema.enabled true)")
        weights.update({k: v.to(weights[k].dtype) for k, v in ema.items() if k in weights})
    return weights

