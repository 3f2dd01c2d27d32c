"""`lit-ovis eval`: generate images for a prompt set, score them, write metrics JSON + an HTML gallery.

Resumable: an image already on disk is not regenerated and a scored sample is not rescored. With
WORLD_SIZE > 1 (torchrun / srun) each rank takes every WORLD_SIZE-th prompt; the report is written by
whichever rank finds every sample finished.

    lit-ovis eval runs/sft/checkpoints/last.ckpt prompts.jsonl --output-dir eval/sft --scorers ocr
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from lit_ovis.errors import CheckpointError, ConfigError, DataError
from lit_ovis.scoring import build_scorer
from lit_ovis.scoring.metrics import ned, word_accuracy
from lit_ovis.scoring.prompt_sets import read_prompt_set


def _save_png(image: torch.Tensor, path: Path) -> None:
    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(arr).save(tmp)
    os.replace(tmp, path)  # a kill never leaves a truncated image that resume would trust


def _atomic_json(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def evaluate(generator, items: list[dict], output_dir: str, scorers: dict, seed: int = 0, batch_size: int = 4,
             steps: int | None = None, guidance_scale: float | None = None, height: int | None = None, width: int | None = None,
             rank: int = 0, world_size: int = 1, progress: bool = True) -> dict | None:
    out = Path(output_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "records").mkdir(parents=True, exist_ok=True)
    mine = [(i, it) for i, it in enumerate(items) if i % world_size == rank]
    todo = [(i, it) for i, it in mine if not (out / "images" / f"{i:06d}.png").exists()]
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc="eval generate", unit="img", disable=not progress, file=sys.stderr)
    for k in range(0, len(todo), batch_size):
        chunk = todo[k : k + batch_size]
        images = generator.sample([it["prompt"] for _, it in chunk], seed=[seed + i for i, _ in chunk], steps=steps,
                                  guidance_scale=guidance_scale, height=height, width=width)
        for (i, _), image in zip(chunk, images):
            _save_png(image, out / "images" / f"{i:06d}.png")
        bar.update(len(chunk))
    bar.close()

    ocr = scorers.get("ocr")
    unscored = [(i, it) for i, it in mine if not (out / "records" / f"{i:06d}.json").exists()]
    for k in range(0, len(unscored), batch_size):
        chunk = unscored[k : k + batch_size]
        images = [Image.open(out / "images" / f"{i:06d}.png").convert("RGB") for i, _ in chunk]
        prompts = [it["prompt"] for _, it in chunk]
        meta = [{"target_text": it["target_text"], "language": it["language"]} for _, it in chunk]
        scores = {name: s.score(images, prompts, meta).tolist() for name, s in scorers.items()}
        texts = ocr.read(images) if ocr is not None else [""] * len(chunk)
        for j, ((i, it), text) in enumerate(zip(chunk, texts)):
            record = {**it, "index": i, "image": f"images/{i:06d}.png", "ocr_text": text,
                      "scores": {name: vals[j] for name, vals in scores.items()}}
            if ocr is not None and it["target_text"]:
                record["word_accuracy"] = word_accuracy(text, it["target_text"], it["language"])
                record["ned"] = ned(text, it["target_text"], it["language"])
            _atomic_json(record, out / "records" / f"{i:06d}.json")
    if not all((out / "records" / f"{i:06d}.json").exists() for i in range(len(items))):
        return None  # other ranks still working; the last one to finish writes the report
    return write_report(out, len(items))


def aggregate(records: list[dict]) -> dict:
    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    agg: dict[str, Any] = {"samples": len(records)}
    for lang in ("all", "en", "zh"):
        subset = [r for r in records if lang == "all" or r["language"] == lang]
        if not subset:
            continue
        entry = {"samples": len(subset)}
        if any("word_accuracy" in r for r in subset):
            entry["word_accuracy"] = mean([r.get("word_accuracy") for r in subset])
            entry["ned"] = mean([r.get("ned") for r in subset])
        for name in subset[0]["scores"]:
            entry[name] = mean([r["scores"][name] for r in subset])
        agg[lang] = entry
    return agg


def _img_b64(path: Path) -> str:
    buf = io.BytesIO()
    Image.open(path).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_report(out: Path, n: int) -> dict:
    records = [json.loads((out / "records" / f"{i:06d}.json").read_text(encoding="utf-8")) for i in range(n)]
    report = {"aggregate": aggregate(records), "samples": records}
    _atomic_json(report, out / "metrics.json")
    rows = []
    for r in records:
        scores = ", ".join(f"{k}={v:.3f}" for k, v in r["scores"].items())
        extra = f"word acc {r['word_accuracy']:.2f}, NED {r['ned']:.2f}" if "word_accuracy" in r else ""
        rows.append(
            f"<tr><td><img src='data:image/png;base64,{_img_b64(out / r['image'])}' width=256></td>"
            f"<td>{html.escape(r['prompt'])}</td><td>{html.escape(r['target_text'])}</td>"
            f"<td>{html.escape(r['ocr_text'])}</td><td>{html.escape(scores)}<br>{extra}</td></tr>"
        )
    agg = html.escape(json.dumps(report["aggregate"], indent=1, ensure_ascii=False))
    page = (
        "<!doctype html><meta charset='utf-8'><title>lit-ovis eval</title>"
        "<style>body{font-family:sans-serif}td{vertical-align:top;padding:4px;border-bottom:1px solid #ddd}</style>"
        f"<h1>lit-ovis eval</h1><pre>{agg}</pre><table><tr><th>image</th><th>prompt</th><th>target text</th>"
        f"<th>OCR text</th><th>scores</th></tr>{''.join(rows)}</table>"
    )
    tmp = out / "gallery.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out / "gallery.html")
    return report


def log_to_tensorboard(aggregate_metrics: dict, log_dir: str, step: int = 0) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir)
    for lang, entry in aggregate_metrics.items():
        if isinstance(entry, dict):
            for k, v in entry.items():
                if isinstance(v, (int, float)) and v is not None:
                    writer.add_scalar(f"eval/{lang}/{k}", v, step)
    writer.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lit-ovis eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a .ckpt file, a sharded checkpoint directory or an exported diffusers folder")
    p.add_argument("prompts", help="JSONL (prompt, language, target_text), CVTG-2K / LongText-Bench JSON, GenEval metadata, or .txt")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--scorers", default="ocr", help="comma-separated scorer names (ocr, clip, pickscore, hps, brightness, ...)")
    p.add_argument("--clip-model", default=None, help="local CLIP folder for clip/pickscore/hps scorers")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--max-sequence-length", type=int, default=None)
    p.add_argument("--use-ema", action="store_true")
    p.add_argument("--tensorboard", default=None, help="log aggregates to this TensorBoard directory")
    args = p.parse_args(argv)
    try:
        from lit_ovis.generator import load_generator

        items = read_prompt_set(args.prompts, args.limit)
        scorers = {}
        for name in [s for s in args.scorers.split(",") if s]:
            kwargs = {"model_path": args.clip_model} if name in ("clip", "pickscore", "hps") else {}
            scorers[name] = build_scorer(name, **kwargs)
        generator = load_generator(args.model, args.max_sequence_length, args.use_ema)
        if torch.cuda.is_available():
            generator.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        report = evaluate(generator, items, args.output_dir, scorers, args.seed, args.batch_size, args.steps, args.guidance_scale,
                          args.height, args.width, int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
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
