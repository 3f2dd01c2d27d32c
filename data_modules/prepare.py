"""`lit-ovis prepare`: images + captions (folder, manifest, or the synthetic engine) -> one LitData
dataset per aspect-ratio bucket of VAE latents (and optionally text embeddings), plus `report.json`.

Steps: decode and validate -> filter (min side, aspect ratio, captions) -> perceptual-hash dedup ->
bucket for the target area -> resize + centre-crop -> VAE-encode in batches -> (text-encode) -> write.

Restartable: inputs are processed in fixed shards; each finished shard is saved atomically under
`<out>/_work/`, and a rerun skips finished shards, so a killed job continues where it stopped and never
duplicates samples. The final LitData write is rebuilt from the shards (cheap) each time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data_modules.buckets import assign_bucket, bucket_name, make_buckets, resize_to_bucket
from data_modules.records import Record, Skip, check_caption, load_image, records_from_folder, records_from_manifest
from lit_ovis.errors import DataError

REPORT = "report.json"
WORK = "_work"


@dataclass
class PrepareConfig:
    output_dir: str
    resolution: int = 256  # target side: buckets have area ~ resolution^2
    min_side: int = 64  # skip images whose short side is smaller
    min_aspect: float = 0.25
    max_aspect: float = 4.0
    max_caption_chars: int = 2000
    dedup: bool = True
    shard_size: int = 256
    batch_size: int = 16  # VAE / text-encoder batch
    num_workers: int = 2  # decode/render processes
    vae: str = "tiny"
    text_encoder: str | None = None  # precompute embeddings with this encoder (None: store captions only)
    max_sequence_length: int = 256
    storage_dtype: str = "float16"  # latents / embeddings on disk
    device: str = "auto"
    seed: int = 0  # synthetic engine seed
    synthetic_size: int | None = None  # synthetic base side (default: resolution)


# ------------------------------------------------------------------------------------ per-record work
def _process(record: Record, cfg: PrepareConfig, buckets: list[tuple[int, int]]):
    """Decode/render, validate, hash and crop one record. Returns (sample dict, None) or (None, reason)."""
    import imagehash

    try:
        if record.synthetic_index is not None:
            from data_modules.synthetic.engine import TextRenderingEngine

            engine = _engine(cfg)
            rendered = engine.render(record.synthetic_index)
            image, caption = rendered.image, rendered.caption
            language, target_text = rendered.language, rendered.text
        else:
            image = load_image(record.path)
            caption, language, target_text = record.caption, record.language, record.target_text
        caption = check_caption(caption, cfg.max_caption_chars)
        if min(image.size) < cfg.min_side:
            raise Skip("too_small")
        ar = image.width / image.height
        if not cfg.min_aspect <= ar <= cfg.max_aspect:
            raise Skip("aspect_ratio")
        phash = str(imagehash.phash(image)) if cfg.dedup else ""
        bucket = assign_bucket(image.width, image.height, buckets)
        pixels = np.asarray(resize_to_bucket(image, bucket), dtype=np.uint8)
    except Skip as skip:
        return None, skip.reason
    return {
        "id": record.id, "caption": caption, "language": language, "target_text": target_text,
        "bucket": bucket, "phash": phash, "pixels": pixels,
    }, None


_ENGINE = None


def _engine(cfg: PrepareConfig):
    global _ENGINE
    if _ENGINE is None:
        from data_modules.synthetic.engine import TextRenderingEngine

        # Render at least twice the min side so every aspect ratio passes the size filter.
        _ENGINE = TextRenderingEngine(seed=cfg.seed, base_size=cfg.synthetic_size or max(cfg.resolution, 2 * cfg.min_side))
    return _ENGINE


def _process_star(args):
    return _process(*args)


# ---------------------------------------------------------------------------------------- encoding
class Encoders:
    def __init__(self, cfg: PrepareConfig):
        from lit_ovis.models.vae import build_vae

        self.device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else ("cpu" if cfg.device == "auto" else cfg.device))
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.vae = build_vae(cfg.vae, dtype=dtype).to(self.device)
        self.text_encoder = None
        if cfg.text_encoder:
            from lit_ovis.models.text_encoder import build_text_encoder

            self.text_encoder = build_text_encoder(cfg.text_encoder, cfg.max_sequence_length, dtype=dtype).to(self.device)
        self.batch_size = cfg.batch_size
        self.storage = getattr(torch, cfg.storage_dtype)

    @torch.no_grad()
    def encode_images(self, pixels: list[np.ndarray]) -> list[torch.Tensor]:
        out = []
        for i in range(0, len(pixels), self.batch_size):
            batch = torch.from_numpy(np.stack(pixels[i : i + self.batch_size])).permute(0, 3, 1, 2)
            images = batch.to(self.device, torch.float32) / 127.5 - 1.0
            out.extend(self.vae.encode(images).to("cpu", self.storage))
        return out

    @torch.no_grad()
    def encode_texts(self, captions: list[str]) -> list[torch.Tensor]:
        out = []
        for i in range(0, len(captions), self.batch_size):
            embeds = self.text_encoder.encode(captions[i : i + self.batch_size]).float().cpu()
            for e in embeds:
                nonzero = (e.abs().sum(-1) > 0).nonzero()
                length = int(nonzero.max()) + 1 if len(nonzero) else 0
                # Padding rows are exactly zero in the pipeline; keep only the valid prefix on disk.
                out.append(e[:length].to(self.storage))
        return out


# ------------------------------------------------------------------------------------------ shards
def _shard_path(out: Path, k: int) -> Path:
    return out / WORK / f"shard-{k:06d}.pt"


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _run_shard(records: list[Record], cfg: PrepareConfig, buckets, encoders: Encoders, pool) -> dict:
    jobs = [(r, cfg, buckets) for r in records]
    results = list(pool.map(_process_star, jobs, chunksize=4)) if pool is not None else [_process_star(j) for j in jobs]
    skipped = Counter(reason for _, reason in results if reason)
    kept = [s for s, _ in results if s is not None]
    by_bucket: dict[tuple, list[dict]] = {}
    for s in kept:
        by_bucket.setdefault(s["bucket"], []).append(s)
    samples = []
    for bucket, group in by_bucket.items():
        latents = encoders.encode_images([s["pixels"] for s in group])
        embeds = encoders.encode_texts([s["caption"] for s in group]) if encoders.text_encoder is not None else [None] * len(group)
        for s, z, e in zip(group, latents, embeds):
            s = {k: v for k, v in s.items() if k != "pixels"}
            s["latents"], s["prompt_embeds"] = z, e
            samples.append(s)
    order = {r.id: i for i, r in enumerate(records)}
    samples.sort(key=lambda s: order[s["id"]])  # deterministic order independent of bucket grouping
    return {"samples": samples, "skipped": dict(skipped), "inputs": len(records)}


def _write_buckets(out: Path, samples: list[dict], resolution: int) -> dict[str, int]:
    from litdata.streaming.writer import BinaryWriter

    by_bucket: dict[str, list[dict]] = {}
    for s in samples:
        by_bucket.setdefault(bucket_name(s["bucket"]), []).append(s)
    sizes = {}
    root = out / str(resolution)
    tmp_root = out / f".{resolution}.tmp"
    shutil.rmtree(tmp_root, ignore_errors=True)
    for name, group in sorted(by_bucket.items()):
        writer = BinaryWriter(str(tmp_root / name), chunk_bytes="64MB")
        for i, s in enumerate(group):
            item = {"id": s["id"], "caption": s["caption"], "language": s["language"], "target_text": s["target_text"], "latents": s["latents"]}
            if s["prompt_embeds"] is not None:
                item["prompt_embeds"] = s["prompt_embeds"]
            writer[i] = item
        writer.done()
        writer.merge()
        sizes[name] = len(group)
    shutil.rmtree(root, ignore_errors=True)
    if tmp_root.exists():
        os.replace(tmp_root, root)
    return sizes


def synthetic_records(n: int) -> list[Record]:
    return [Record(id=f"syn-{i:08d}", caption="", synthetic_index=i) for i in range(n)]


def prepare(records: list[Record], cfg: PrepareConfig, progress: bool = True) -> dict:
    out = Path(cfg.output_dir)
    (out / WORK).mkdir(parents=True, exist_ok=True)
    buckets = make_buckets(cfg.resolution, cfg.min_aspect, cfg.max_aspect)
    shards = [records[i : i + cfg.shard_size] for i in range(0, len(records), cfg.shard_size)]
    todo = [k for k in range(len(shards)) if not _shard_path(out, k).exists()]
    start = time.perf_counter()
    if todo:
        encoders = Encoders(cfg)
        pool = ProcessPoolExecutor(cfg.num_workers) if cfg.num_workers > 1 else None
        try:
            bar = tqdm(total=sum(len(shards[k]) for k in todo), desc="prepare", unit="img", disable=not progress, file=sys.stderr)
            for k in todo:
                result = _run_shard(shards[k], cfg, buckets, encoders, pool)
                _atomic_torch_save(result, _shard_path(out, k))
                bar.update(len(shards[k]))
            bar.close()
        finally:
            if pool is not None:
                pool.shutdown()
    elapsed = time.perf_counter() - start

    # Finalise from all shards: global dedup (first occurrence wins), per-bucket datasets, report.
    skipped: Counter = Counter()
    kept, seen = [], set()
    total = 0
    for k in range(len(shards)):
        shard = torch.load(_shard_path(out, k), weights_only=False)
        total += shard["inputs"]
        skipped.update(shard["skipped"])
        for s in shard["samples"]:
            if cfg.dedup and s["phash"] in seen:
                skipped["duplicate"] += 1
                continue
            seen.add(s["phash"])
            kept.append(s)
    sizes = _write_buckets(out, kept, cfg.resolution)
    report = {
        "inputs": total,
        "kept": len(kept),
        "skipped": dict(sorted(skipped.items())),
        "buckets": sizes,
        "resolution": cfg.resolution,
        "has_prompt_embeds": bool(cfg.text_encoder),
        "config": asdict(cfg),
        "processed_this_run": sum(len(shards[k]) for k in todo),
        "seconds_this_run": round(elapsed, 3),
    }
    tmp = out / f".{REPORT}.tmp"
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, out / REPORT)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lit-ovis prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image-dir", help="folder of images with sidecar .txt captions")
    src.add_argument("--manifest", help="JSONL or CSV with path, caption[, language, caption_zh, target_text]")
    src.add_argument("--synthetic", type=int, metavar="N", help="render N samples with the synthetic text engine")
    p.add_argument("--output-dir", required=True)
    for field_name, default in asdict(PrepareConfig(output_dir="")).items():
        if field_name == "output_dir":
            continue
        flag = "--" + field_name.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, type=lambda v: v.lower() in ("1", "true", "yes"), default=default)
        else:
            p.add_argument(flag, type=type(default) if default is not None else str, default=default)
    args = p.parse_args(argv)
    values = {k.replace("-", "_"): v for k, v in vars(args).items()}
    cfg = PrepareConfig(**{k: values[k] for k in asdict(PrepareConfig(output_dir="")) if k in values})
    try:
        if args.synthetic is not None:
            records = synthetic_records(args.synthetic)
        elif args.image_dir:
            records = records_from_folder(args.image_dir)
        else:
            records = records_from_manifest(args.manifest)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = prepare(records, cfg)
    print(json.dumps({k: report[k] for k in ("inputs", "kept", "skipped", "buckets")}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
