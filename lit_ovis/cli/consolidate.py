"""`lit-ovis consolidate`: a sharded (DCP) training checkpoint -> one safetensors file of the backbone in
diffusers key layout, and optionally a diffusers folder (`OvisImageTransformer2DModel.save_pretrained`).
Runs in one process without GPUs; the full model must fit in host memory (~30 GB fp32 for 7B)."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from lit_ovis.errors import CheckpointError


def load_sharded_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a Lightning ModelParallelStrategy checkpoint directory into one in-memory checkpoint dict."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = Path(path)
    if not (path / ".metadata").exists():
        raise CheckpointError(f"{path}: not a complete sharded checkpoint (no .metadata); use an earlier checkpoint")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "full.pt"
        dcp_to_torch_save(str(path), str(out))
        state = torch.load(out, map_location="cpu", weights_only=False)
    meta = path / "meta.pt"
    if meta.exists():
        state.update(torch.load(meta, map_location="cpu", weights_only=False))
    return state


def consolidate(checkpoint: str, output: str, use_ema: bool = False, diffusers_dir: str | None = None) -> Path:
    from safetensors.torch import save_file

    from lit_ovis.checkpoints import backbone_state_dict, hyper_parameters, load_training_checkpoint

    ckpt = load_training_checkpoint(checkpoint)
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
    p = argparse.ArgumentParser(prog="lit-ovis consolidate", description=__doc__)
    p.add_argument("checkpoint", help="sharded checkpoint directory (or a .ckpt file)")
    p.add_argument("output", help="output .safetensors file (backbone, diffusers key layout)")
    p.add_argument("--use-ema", action="store_true")
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
