"""`lit-ovis eval`: generate images for a prompt set, score them, write metrics JSON + an HTML gallery.

Metrics follow the benchmarks' own scripts (`lit_ovis.scoring.metrics`): CVTG-2K word accuracy and NED pooled
over every target word (overall, EN / ZH, and per region count 2-5 for CVTG-2K prompts), LongText-Bench text
accuracy pooled over words (EN) or characters (ZH), CLIPScore as CVTG-2K reports it, and any registered scorer.

Resumable and safe to rerun: every sample has a fingerprint of its prompt record, seed, model identity (path,
size and modification time of the weights) and sampling settings. An image is reused only when its
fingerprint matches, so a changed prompt file, checkpoint or setting regenerates exactly the samples it
affects; a scorer added on a rerun is computed for the existing images without regenerating them.
With WORLD_SIZE > 1 (torchrun / srun) each rank takes every WORLD_SIZE-th prompt; the report is written by
whichever rank finds every sample finished.

    lit-ovis eval runs/sft/checkpoints/last.ckpt prompts.jsonl --output-dir eval/sft --scorers ocr
    lit-ovis eval exported/ CVTG-2K/ --output-dir eval/cvtg --scorers ocr,clip --clip-model /models/clip-vit-large-patch14
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import io
import json
import os
import sys
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from lit_ovis.errors import CheckpointError, ConfigError, DataError, OneLineArgumentParser
from lit_ovis.files import atomic_path, atomic_write, atomic_write_json
from lit_ovis.scoring import Scorer, ScorerEnsemble
from lit_ovis.scoring.ensemble import build_ensemble as ensemble_from_options
from lit_ovis.scoring.metrics import aggregate
from lit_ovis.scoring.prompt_sets import read_prompt_set

RECORD_KEYS = ("id", "prompt", "target_text", "target_texts", "language", "benchmark", "regions", "subset", "tag")
OCR_FIELDS = ("ocr_text", "word_accuracy", "ned", "text_accuracy", "reward")
CLIP_SCORERS = ("clip", "pickscore", "hps", "aesthetic")  # the scorers --clip-model gives their weights
SIZE_KEYS = ("width", "height")  # a prompt record's own image size (e.g. the word task's buckets)


def _save_png(image: torch.Tensor, path: Path) -> None:
    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    with atomic_path(path) as tmp:  # a kill never leaves a truncated image that resume would trust
        Image.fromarray(arr).save(tmp, format="PNG")


def model_identity(path: str, **settings) -> str:
    """Cheap identity of the weights: resolved path plus size and mtime of every file (no hashing of GBs)."""
    p = Path(path).resolve()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    parts = [str(p)] + [f"{f.relative_to(p) if f != p else f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    return hashlib.sha256(json.dumps([parts, settings], sort_keys=True).encode()).hexdigest()[:16]


def fingerprint(item: dict, seed: int, model_id: str, sampling: dict) -> str:
    record = {k: item.get(k) for k in RECORD_KEYS}
    record.update({k: item[k] for k in SIZE_KEYS if item.get(k)})  # only when present: older records keep their print
    blob = json.dumps({"item": record, "seed": seed, "model": model_id, "sampling": sampling}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _as_ensemble(scorers) -> ScorerEnsemble:
    if isinstance(scorers, ScorerEnsemble):
        return scorers
    return ScorerEnsemble(dict(scorers))


def _load_record(path: Path, fp: str) -> dict | None:
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # a corrupt record is rescored
    return record if record.get("fingerprint") == fp else None


def evaluate(generator, items: list[dict], output_dir: str, scorers: ScorerEnsemble | dict[str, Scorer], seed: int = 0,
             batch_size: int = 4, steps: int | None = None, guidance_scale: float | None = None, height: int | None = None,
             width: int | None = None, rank: int = 0, world_size: int = 1, progress: bool = True, model_id: str = "") -> dict | None:
    ensemble = _as_ensemble(scorers)
    names = list(ensemble.scorers)
    out = Path(output_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "records").mkdir(parents=True, exist_ok=True)
    sampling = {"steps": steps, "guidance_scale": guidance_scale, "height": height, "width": width}
    fps = [fingerprint(it, seed + i, model_id, sampling) for i, it in enumerate(items)]
    image_of = lambda i: out / "images" / f"{i:06d}-{fps[i]}.png"  # noqa: E731
    mine = [(i, it) for i, it in enumerate(items) if i % world_size == rank]

    todo = [(i, it) for i, it in mine if not image_of(i).exists()]
    for i, _ in todo:  # images of an older prompt / model / setting at this position are stale
        for old in (out / "images").glob(f"{i:06d}-*.png"):
            old.unlink()
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc="eval generate", unit="img", disable=not progress, file=sys.stderr)
    # --height/--width apply to every prompt; otherwise a record's own width/height (else the model's default).
    by_size: dict[tuple, list[tuple[int, dict]]] = {}
    for i, it in todo:
        by_size.setdefault((height or it.get("height"), width or it.get("width")), []).append((i, it))
    for (h, w), group in by_size.items():
        for k in range(0, len(group), batch_size):
            chunk = group[k: k + batch_size]
            images = generator.sample([it["prompt"] for _, it in chunk], seed=[seed + i for i, _ in chunk], steps=steps,
                                      guidance_scale=guidance_scale, height=h, width=w)
            for (i, _), image in zip(chunk, images):
                _save_png(image, image_of(i))
            bar.update(len(chunk))
    bar.close()

    # Score what each record lacks: everything for a new or stale record, only new scorers otherwise.
    # Grouped by image size too: scorers that batch pixels as one tensor need one size per call.
    pending: dict[tuple, list[tuple[int, dict, dict]]] = {}
    for i, it in mine:
        record = _load_record(out / "records" / f"{i:06d}.json", fps[i]) or {
            **{k: it.get(k) for k in RECORD_KEYS}, "index": i, "fingerprint": fps[i], "image": f"images/{image_of(i).name}", "scores": {}}
        missing = tuple(n for n in names if n not in record["scores"])
        if missing:
            size = (height or it.get("height"), width or it.get("width"))
            pending.setdefault((missing, size), []).append((i, it, record))
    for (missing, _), group in pending.items():
        for k in range(0, len(group), batch_size):
            chunk = group[k: k + batch_size]
            images = [Image.open(out / r["image"]).convert("RGB") for _, _, r in chunk]
            prompts = [it["prompt"] for _, it, _ in chunk]
            meta = [{"target_text": it["target_text"], "language": it["language"]} for _, it, _ in chunk]
            raw, details = ensemble.components(images, prompts, meta, only=missing)
            for j, (i, _, record) in enumerate(chunk):
                record["scores"].update({n: float(raw[n][j]) for n in missing})
                if "ocr" in details[j]:  # one OCR read gave every text metric
                    record["ocr"] = details[j]["ocr"]
                    record.update({f: details[j]["ocr"][f] for f in OCR_FIELDS})
                atomic_write_json(out / "records" / f"{i:06d}.json", record, indent=1)

    for i in range(len(items)):
        record = _load_record(out / "records" / f"{i:06d}.json", fps[i])
        if record is None or any(n not in record["scores"] for n in names):
            return None  # other ranks still working; the last one to finish writes the report
    return write_report(out, fps, ensemble)


def _img_b64(path: Path) -> str:
    buf = io.BytesIO()
    Image.open(path).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_report(out: Path, fps: list[str], ensemble: ScorerEnsemble) -> dict:
    names = list(ensemble.scorers)
    records = [_load_record(out / "records" / f"{i:06d}.json", fp) for i, fp in enumerate(fps)]
    if names and records:
        total = ensemble.combine({n: torch.tensor([r["scores"][n] for r in records]) for n in names})
        for r, t in zip(records, total.tolist()):
            r["scores"]["ensemble"] = t
    report = {"aggregate": aggregate(records, names + (["ensemble"] if len(names) > 1 else [])),
              "weights": ensemble.weights, "samples": records}
    atomic_write_json(out / "metrics.json", report, indent=1)
    rows = []
    for r in records:
        scores = ", ".join(f"{k}={v:.3f}" for k, v in r["scores"].items())
        extra = (f"word acc {r['word_accuracy']:.2f}, NED {r['ned']:.2f}, text acc {r['text_accuracy']:.2f}"
                 if r.get("ocr") and r["ocr"]["word_total"] > 0 else "")
        rows.append(
            f"<tr><td><img src='data:image/png;base64,{_img_b64(out / r['image'])}' width=256></td>"
            f"<td>{html.escape(r['prompt'])}</td><td>{html.escape(r['target_text'] or '')}</td>"
            f"<td>{html.escape(r.get('ocr_text', ''))}</td><td>{html.escape(scores)}<br>{extra}</td></tr>"
        )
    agg = html.escape(json.dumps(report["aggregate"], indent=1, ensure_ascii=False))
    page = (
        "<!doctype html><meta charset='utf-8'><title>lit-ovis eval</title>"
        "<style>body{font-family:sans-serif}td{vertical-align:top;padding:4px;border-bottom:1px solid #ddd}</style>"
        f"<h1>lit-ovis eval</h1><pre>{agg}</pre><table><tr><th>image</th><th>prompt</th><th>target text</th>"
        f"<th>OCR text</th><th>scores</th></tr>{''.join(rows)}</table>"
    )
    atomic_write(out / "gallery.html", page)
    return report


def flatten(metrics: dict, prefix: str = "") -> dict[str, float]:
    flat = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            flat.update(flatten(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            flat[f"{prefix}{k}"] = float(v)
    return flat


def log_to_tensorboard(aggregate_metrics: dict, log_dir: str, step: int = 0) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir)
    for k, v in flatten(aggregate_metrics, "eval/").items():
        writer.add_scalar(k, v, step)
    writer.close()


def build_ensemble(spec: str, clip_model: str | None, scorer_kwargs: str) -> ScorerEnsemble:
    """`--scorers` with `--scorer-kwargs`; `--clip-model` fills every CLIP-family scorer's model_path."""
    clip = {name: {"model_path": clip_model} for name in CLIP_SCORERS} if clip_model else {}
    return ensemble_from_options(spec, scorer_kwargs, flags={"model_path": "--clip-model"}, defaults=clip)


def main(argv: list[str] | None = None) -> int:
    p = OneLineArgumentParser(prog="lit-ovis eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a .ckpt file, a sharded checkpoint directory, an exported diffusers folder or a hub id "
                                 "(lit_ovis.load_module)")
    p.add_argument("prompts", help="JSONL (prompt, language, target_text), a CVTG-2K file or root folder, "
                                   "LongText-Bench JSONL, GenEval metadata, or .txt")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--scorers", default="ocr", help="comma-separated scorer names with optional weights for the "
                                                    "'ensemble' column, e.g. ocr,clip or ocr=1,clip=0.5")
    p.add_argument("--clip-model", default=None, help="local CLIP folder for clip / pickscore / hps / aesthetic "
                                                      "(CVTG-2K uses openai/clip-vit-large-patch14)")
    p.add_argument("--scorer-kwargs", default="{}", help='JSON {"scorer": {...}} passed to the scorers, e.g. '
                                                         '\'{"aesthetic": {"head_path": "sa_0_4_vit_l_14_linear.pt"}}\'')
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--height", type=int, default=None, help="image height for every prompt (default: a record's own "
                                                               "'height', else the model's sampling height)")
    p.add_argument("--width", type=int, default=None, help="image width for every prompt (default: a record's own 'width', "
                                                              "else the model's sampling width)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--max-sequence-length", type=int, default=None)
    p.add_argument("--weights", default="auto", choices=["auto", "ema", "raw"],  # lit_ovis.checkpoints.WEIGHTS
                   help="training checkpoints: auto = the EMA weights when the run sampled with them, else raw")
    p.add_argument("--tensorboard", default=None, help="log aggregates to this TensorBoard directory")
    args = p.parse_args(argv)
    try:
        from lit_ovis.loading import load_module

        items = read_prompt_set(args.prompts, args.limit)
        ensemble = build_ensemble(args.scorers, args.clip_model, args.scorer_kwargs)
        generator = load_module(args.model, weights=args.weights, max_sequence_length=args.max_sequence_length)
        model_id = model_identity(args.model, weights=args.weights, max_sequence_length=args.max_sequence_length)
        if torch.cuda.is_available():
            generator.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        report = evaluate(generator, items, args.output_dir, ensemble, args.seed, args.batch_size, args.steps, args.guidance_scale,
                          args.height, args.width, int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                          model_id=model_id)
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if report is not None:
        if args.tensorboard:
            log_to_tensorboard(report["aggregate"], args.tensorboard)
        print(json.dumps(report["aggregate"], ensure_ascii=False, indent=1))
        print(f"wrote {Path(args.output_dir) / 'metrics.json'} and {Path(args.output_dir) / 'gallery.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
