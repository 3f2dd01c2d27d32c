"""Reading training checkpoints: single-file Lightning `.ckpt` or sharded DCP directories.

Returns the backbone weights in diffusers key layout (optionally the EMA weights) and the module's
hyper-parameters, so export and eval need no stage-specific code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from lit_ovis.errors import CheckpointError

BACKBONE_PREFIX = "backbone."
EMA_PREFIX = "ema."


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


def load_training_checkpoint(path: str | os.PathLike, ema: bool = True) -> dict[str, Any]:
    """Load a `.ckpt` file or a sharded checkpoint directory into one in-memory checkpoint dict. From a
    sharded directory only the backbone (and with `ema` the EMA weights) is read, never optimizer state;
    pass `ema=False` when the EMA weights will not be used (halves the memory of a sharded load)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: checkpoint not found; pass a .ckpt file or a sharded checkpoint directory")
    if p.is_dir():
        from lit_ovis.cli.consolidate import load_sharded_checkpoint

        return load_sharded_checkpoint(p, ema=ema)
    return _load_file(p)


# `--weights` of export / eval: which backbone weights a training checkpoint gives (`backbone_state_dict`'s use_ema).
WEIGHTS = {"auto": None, "ema": True, "raw": False}


def uses_ema_weights(checkpoint: dict[str, Any]) -> bool:
    """True when the checkpoint holds EMA weights and its run sampled with them (`ema.use_for_sampling`)."""
    if not any(k.startswith(EMA_PREFIX) for k in checkpoint.get("state_dict") or {}):
        return False
    ema = hyper_parameters(checkpoint).get("ema")
    return bool(ema.get("use_for_sampling", True) if isinstance(ema, dict) else getattr(ema, "use_for_sampling", True))


def backbone_state_dict(checkpoint: dict[str, Any], use_ema: bool | None = False) -> dict[str, torch.Tensor]:
    """Backbone weights in diffusers key layout; `use_ema=None`: the weights the run sampled its grids with
    (the EMA weights when it kept and used an EMA), which is what export, eval and the next stage start from."""
    if use_ema is None:
        use_ema = uses_ema_weights(checkpoint)
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError("checkpoint has no 'state_dict'; is it a lit-ovis training checkpoint?")
    weights = {k[len(BACKBONE_PREFIX):]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
    if not weights:
        raise CheckpointError("checkpoint holds no backbone weights (no 'backbone.' keys); is it a lit-ovis training checkpoint?")
    if use_ema:
        ema = {k[len(EMA_PREFIX):].replace("__", "."): v for k, v in state.items() if k.startswith(EMA_PREFIX)}
        if not ema:
            raise CheckpointError("--use_ema was given but the checkpoint has no EMA weights (train with --model.ema.enabled true)")
        weights.update({k: v.to(weights[k].dtype) for k, v in ema.items() if k in weights})
    return weights


def hyper_parameters(checkpoint: dict[str, Any]) -> dict[str, Any]:
    return dict(checkpoint.get("hyper_parameters") or {})
