"""`lit-ovis consolidate`: a sharded (DCP) training checkpoint -> one safetensors file of the backbone in
diffusers key layout, and optionally a diffusers folder (`OvisImageTransformer2DModel.save_pretrained`).
Runs in one process without GPUs; reads only the backbone (or backbone + EMA with --use-ema) from the
checkpoint, so host memory needs ~30 GB fp32 for 7B (~60 GB with --use-ema), never the optimizer state."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from lit_ovis.errors import CheckpointError, OneLineArgumentParser


MODEL_PREFIXES = ("state_dict.backbone.",)
EMA_PREFIXES = ("state_dict.ema.",)


def load_sharded_checkpoint(path: str | os.PathLike, ema: bool = True) -> dict[str, Any]:
    """Read the backbone (and with `ema` the EMA weights) of a Lightning ModelParallelStrategy checkpoint
    directory into one in-memory checkpoint dict, plus the small `meta.pt` (hyper-parameters, loops).

    Only those tensors are read: the state dict to load is built from the DCP metadata for the requested
    keys and `dcp.load` fills it, so the optimizer moments (2x the weights) never reach host memory.
    """
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    if not (path / ".metadata").exists():
        raise CheckpointError(f"{path}: not a complete sharded checkpoint (no .metadata); use an earlier checkpoint")
    reader = FileSystemReader(str(path))
    try:
        metadata = reader.read_metadata()
    except Exception as err:  # noqa: BLE001 - a truncated or foreign .metadata
        raise CheckpointError(f"{path}/.metadata: unreadable ({type(err).__name__}); use an earlier checkpoint") from None
    prefixes = MODEL_PREFIXES + (EMA_PREFIXES if ema else ())
    flat: dict[str, torch.Tensor] = {}
    for key, item in metadata.state_dict_metadata.items():
        if key.startswith(prefixes) and isinstance(item, TensorStorageMetadata):
            flat[key] = torch.empty(item.size, dtype=item.properties.dtype)
    if not flat:
        raise CheckpointError(f"{path}: holds no backbone weights (no 'state_dict.backbone.' keys); is it a lit-ovis training checkpoint?")
    state_dict = {k[len("state_dict."):]: v for k, v in flat.items()}
    with warnings.catch_warnings():  # single-process loading is the intent here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        load({"state_dict": state_dict}, storage_reader=reader, no_dist=True)
    state: dict[str, Any] = {"state_dict": state_dict}
    meta = path / "meta.pt"
    if meta.exists():
        state.update(torch.load(meta, map_location="cpu", weights_only=False))
    return state


def consolidate(checkpoint: str, output: str, use_ema: bool | None = None, diffusers_dir: str | None = None) -> Path:
    """`use_ema=None`: the weights the run sampled with (EMA when it had and used one), like `export`."""
    from safetensors.torch import save_file

    from lit_ovis.checkpoints import backbone_state_dict, hyper_parameters, load_training_checkpoint

    ckpt = load_training_checkpoint(checkpoint, ema=use_ema is not False)
    weights = {k: v.contiguous() for k, v in backbone_state_dict(ckpt, use_ema=use_ema).items()}
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(weights, str(tmp))
    os.replace(tmp, out)
    if diffusers_dir:
        from lit_ovis.models.backbone import build_backbone

        hp = hyper_parameters(ckpt)
        preset = (hp.get("backbone") or {}).get("preset", "tiny") if isinstance(hp.get("backbone"), dict) else getattr(hp.get("backbone"), "preset", "tiny")
        model = build_backbone(preset, pretrained=str(out))
        model.save_pretrained(diffusers_dir, safe_serialization=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = OneLineArgumentParser(prog="lit-ovis consolidate", description=__doc__)
    p.add_argument("checkpoint", help="sharded checkpoint directory (or a .ckpt file)")
    p.add_argument("output", help="output .safetensors file (backbone, diffusers key layout)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--use-ema", "--ema", dest="use_ema", action="store_const", const=True, default=None,
                       help="write the EMA weights (default: the EMA weights when the run sampled with them, else raw)")
    which.add_argument("--raw", dest="use_ema", action="store_const", const=False, help="write the raw (non-EMA) weights")
    p.add_argument("--diffusers-dir", default=None, help="also write an OvisImageTransformer2DModel folder here")
    args = p.parse_args(argv)
    try:
        out = consolidate(args.checkpoint, args.output, args.use_ema, args.diffusers_dir)
    except CheckpointError as err:
        print(f"error: {err}")
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
