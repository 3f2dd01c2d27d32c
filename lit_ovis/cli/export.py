"""`lit-ovis export`: training checkpoint -> diffusers folder that `OvisImagePipeline.from_pretrained` opens.

The backbone is already stored in diffusers key layout, so this is a rename: strip `backbone.`, attach
the frozen text encoder, tokenizer and VAE the run used, and the pipeline's scheduler.

A LoRA run's checkpoint (`--model.lora.enabled true`) exports either merged (`--lora merged`, default: its base,
read from the `backbone.pretrained` the run recorded, with the adapter merged in: the same full folder) or as
the adapter alone (`--lora adapter`: diffusers' `save_lora_adapter` file, loaded onto the base pipeline with
`pipe.transformer.load_lora_adapter(folder, prefix=None, use_safetensors=True)`); `--lora-scale` scales the
adapter's update in both.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from diffusers import OvisImagePipeline

from lit_ovis.checkpoints import WEIGHTS, adapter_state_dict, config_section, load_training_checkpoint, lora_entry
from lit_ovis.dtypes import DTYPES
from lit_ovis.errors import CheckpointError, OneLineArgumentParser
from lit_ovis.models.backbone import backbone_from_checkpoint, checkpoint_architecture
from lit_ovis.models.lora import save_adapter
from lit_ovis.models.text_encoder import build_text_encoder
from lit_ovis.models.vae import build_vae
from lit_ovis.modules.config import EncoderConfig
from lit_ovis.sampling.generate import SamplingConfig
from lit_ovis.sampling.scheduler import scheduler_for


def build_pipeline(transformer, text_encoder, vae, sampling: SamplingConfig) -> OvisImagePipeline:
    return OvisImagePipeline(
        scheduler=scheduler_for(sampling), vae=vae.vae, text_encoder=text_encoder.model,
        tokenizer=text_encoder.tokenizer, transformer=transformer,
    )


LORA_EXPORTS = ("merged", "adapter")


def export_checkpoint(checkpoint_path: str, output_dir: str, use_ema: bool | None = None, dtype: str = "fp32",
                      lora: str = "merged", lora_scale: float = 1.0) -> Path:
    """`use_ema=None`: the weights the run sampled its grids with (EMA when it had and used one). A LoRA checkpoint
    exports merged into its base or, with `lora="adapter"`, as the adapter alone; `lora_scale` scales its update."""
    ckpt = load_training_checkpoint(checkpoint_path, ema=use_ema is not False)
    entry = lora_entry(ckpt)
    if entry is None and (lora != "merged" or lora_scale != 1.0):
        raise CheckpointError(f"{checkpoint_path}: holds full backbone weights, not a LoRA adapter; drop --lora/--lora-scale")
    if lora == "adapter":
        adapter = adapter_state_dict(ckpt, use_ema=use_ema)
        arch = checkpoint_architecture(ckpt)
        return write_atomically(output_dir, lambda tmp: save_adapter(entry, adapter, tmp, lora_scale, arch))
    encoders = config_section(ckpt, "encoders", EncoderConfig)
    sampling = config_section(ckpt, "sampling", SamplingConfig)
    transformer = backbone_from_checkpoint(ckpt, use_ema=use_ema, source=checkpoint_path,  # the architecture it trained
                                           lora_scale=lora_scale)
    torch_dtype = DTYPES[dtype]
    if encoders.template_cut != "pipeline":  # the exported pipeline always cuts OvisImagePipeline's 28 tokens
        print(f"warning: {checkpoint_path} trained with template_cut={encoders.template_cut}; OvisImagePipeline cuts 28 "
              "template tokens, so the export's samples differ from the run's (lit_ovis.load_module on the checkpoint "
              "samples as trained)", file=sys.stderr)
    pipe = build_pipeline(
        transformer.to(torch_dtype),
        build_text_encoder(encoders.text_encoder, encoders.max_sequence_length, dtype=torch_dtype),
        build_vae(encoders.vae, dtype=torch_dtype),
        sampling,
    )
    return write_atomically(output_dir, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))


def write_atomically(output_dir: str, write) -> Path:
    """`write(tmp_folder)` next to the target, then rename, so an interrupted export never leaves a half folder."""
    out = Path(output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(prog="lit-ovis export", description=__doc__)
    parser.add_argument("checkpoint", help="a .ckpt file or a sharded checkpoint directory")
    parser.add_argument("output_dir", help="diffusers folder to write (replaced atomically if it exists)")
    parser.add_argument("--weights", default="auto", choices=list(WEIGHTS),
                        help="auto: the EMA weights when the run sampled with them (its grids show them), else raw")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--lora", default="merged", choices=list(LORA_EXPORTS),
                        help="LoRA checkpoints: merged = a full folder (base + adapter); adapter = the adapter alone "
                             "(save_lora_adapter format, for pipe.transformer.load_lora_adapter(folder, prefix=None, use_safetensors=True))")
    parser.add_argument("--lora-scale", type=float, default=1.0, help="LoRA checkpoints: scale of the adapter's update")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.output_dir, WEIGHTS[args.weights], args.dtype, args.lora, args.lora_scale)
    except CheckpointError as err:
        print(f"error: {err}")
        return 2
    if args.lora == "adapter":
        print(f"exported the LoRA adapter of {args.checkpoint} -> {out} (on an OvisImagePipeline of its base: "
              f"pipe.transformer.load_lora_adapter('{out}', prefix=None, use_safetensors=True))")
        return 0
    print(f"exported {args.checkpoint} -> {out} (open with OvisImagePipeline.from_pretrained)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
