"""`lit-ovis consolidate`: a sharded (DCP) training checkpoint -> one safetensors file of the backbone in
diffusers key layout, and optionally a diffusers folder (`OvisImageTransformer2DModel.save_pretrained`).
Runs in one process without GPUs; reads only the backbone (or backbone + EMA with --use-ema) from the
checkpoint, so host memory needs ~30 GB fp32 for 7B (~60 GB with --use-ema), never the optimizer state."""

from __future__ import annotations

from pathlib import Path

from lit_ovis.checkpoints import backbone_state_dict, load_training_checkpoint
from lit_ovis.errors import CheckpointError, OneLineArgumentParser
from lit_ovis.files import atomic_path


def consolidate(checkpoint: str, output: str, use_ema: bool | None = None, diffusers_dir: str | None = None) -> Path:
    """`use_ema=None`: the weights the run sampled with (EMA when it had and used one), like `export`."""
    from safetensors.torch import save_file

    ckpt = load_training_checkpoint(checkpoint, ema=use_ema is not False)
    weights = {k: v.contiguous() for k, v in backbone_state_dict(ckpt, use_ema=use_ema).items()}
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        save_file(weights, str(tmp))
    if diffusers_dir:
        from lit_ovis.models.backbone import build_backbone, checkpoint_architecture

        model = build_backbone(pretrained=str(out), architecture=checkpoint_architecture(ckpt))
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
