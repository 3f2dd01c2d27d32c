"""`lit-ovis <verb>` (or `python -m lit_ovis <verb>`): the tools beside LightningCLI."""

from __future__ import annotations

import importlib
import sys

VERBS = {
    "fit": ("lit_ovis.cli.lightning_cli", "train (same as python main.py fit)"),
    "validate": ("lit_ovis.cli.lightning_cli", "validate a checkpoint"),
    "predict": ("lit_ovis.cli.lightning_cli", "write PNGs for a prompt file"),
    "prepare": ("data_modules.prepare", "images / manifest / tars / Parquet / synthetic engine -> bucketed LitData latents (sharded over GPUs and nodes)"),
    "word-task": ("lit_ovis.cli.word_task", "render the CPU-scale word-rendering task (train / held-out / unseen splits)"),
    "train-autoencoder": ("lit_ovis.cli.autoencoder", "train (or reuse) a small decodable AutoencoderKL; OCR of its reconstructions"),
    "export": ("lit_ovis.cli.export", "training checkpoint -> diffusers OvisImagePipeline folder"),
    "eval": ("lit_ovis.cli.eval", "generate + score a prompt set; JSON metrics and HTML gallery"),
    "make-pairs": ("data_modules.make_pairs", "build DPO preference pairs with a scorer ensemble"),
    "estimate-memory": ("lit_ovis.cli.estimate_memory", "per-GPU memory for a preset, mesh, resolution, batch"),
    "consolidate": ("lit_ovis.cli.consolidate", "sharded checkpoint -> one safetensors file / diffusers folder"),
    "submit": ("lit_ovis.cli.submit", "render (and submit) a SLURM sbatch script from a config"),
}


def usage() -> str:
    lines = ["usage: lit-ovis <verb> [--help]", "", "verbs:"]
    lines += [f"  {verb:<16} {desc}" for verb, (_, desc) in VERBS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        from lit_ovis.errors import closest

        guess = closest(verb, VERBS)
        print(f"error: unknown verb '{verb}'" + (f" (did you mean '{guess}'?)" if guess else "") + "\nsee all verbs: lit-ovis --help",
              file=sys.stderr)
        return 2
    module = importlib.import_module(VERBS[verb][0])
    if module.__name__ == "lit_ovis.cli.lightning_cli":
        module.run([verb, *rest])
        return 0
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
