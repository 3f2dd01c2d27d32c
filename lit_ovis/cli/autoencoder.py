"""`lit-ovis train-autoencoder`: train (or reuse) a small AutoencoderKL on a manifest's images and report how
legible its reconstructions keep text (see lit_ovis/models/autoencoder_training.py).

    lit-ovis word-task --output-dir data/words
    lit-ovis train-autoencoder --manifest data/words/train.jsonl --output-dir data/words/autoencoder \\
        --eval-manifest data/words/heldout.jsonl --eval-manifest data/words/unseen.jsonl

The output folder is a diffusers VAE folder: pass it as --model.encoders.vae / --data.vae / prepare --vae.
A rerun with the same settings and images reuses it at once; other settings need --overwrite.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lit_ovis.errors import OneLineArgumentParser, UserError
from lit_ovis.files import atomic_write_json
from lit_ovis.options import add_options, from_options
from lit_ovis.models.autoencoder_training import REPORT, AutoencoderConfig, ensure_autoencoder


def main(argv: list[str] | None = None) -> int:
    p = OneLineArgumentParser(prog="lit-ovis train-autoencoder", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", required=True, help="JSONL/CSV with path (and caption) of the training images")
    p.add_argument("--output-dir", required=True, help="diffusers VAE folder to write (or reuse)")
    p.add_argument("--overwrite", action="store_true", help="replace an autoencoder trained with other settings")
    p.add_argument("--eval-manifest", action="append", default=[], help="measure OCR of these images and of their "
                   "reconstructions (rows with path, target_text, language); repeatable")
    p.add_argument("--eval-limit", type=int, default=None, help="at most this many images per eval manifest")
    p.add_argument("--ocr-mode", default="recognize", choices=["recognize", "detect"], help="OCR path for the eval")
    p.add_argument("--log-every", type=int, default=100)
    add_options(p, AutoencoderConfig)
    args = p.parse_args(argv)
    cfg = from_options(AutoencoderConfig, args)
    try:
        folder, report = ensure_autoencoder(cfg, args.manifest, args.output_dir, args.overwrite, log_every=args.log_every)
        summary = {k: report[k] for k in ("fingerprint", "parameters", "scale_factor", "train_seconds", "train_cpu_seconds", "scaling_factor",
                                          "shift_factor", "trained_this_run") if k in report}
        if args.eval_manifest:
            summary["eval"] = evaluate(folder, args.eval_manifest, args.eval_limit, args.ocr_mode)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, ensure_ascii=False, indent=1))
    print(f"autoencoder: {folder} (use it as --model.encoders.vae / --data.vae / prepare --vae)")
    return 0


def evaluate(folder: Path, manifests: list[str], limit: int | None, mode: str) -> dict:
    """Reconstruction OCR per manifest, also stored in the folder's report under `eval`."""
    from lit_ovis.models.vae import build_vae
    from lit_ovis.scoring import build_scorer
    from lit_ovis.scoring.reconstruction import measure_reconstructions

    vae = build_vae(str(folder))
    ocr = build_scorer("ocr", mode=mode, batch_size=32)
    results = {Path(m).stem: {**measure_reconstructions(vae, m, ocr, limit=limit), "ocr_mode": mode} for m in manifests}
    report = json.loads((folder / REPORT).read_text(encoding="utf-8"))
    report["eval"] = {**report.get("eval", {}), **results}
    atomic_write_json(folder / REPORT, report)
    return results


if __name__ == "__main__":
    raise SystemExit(main())
