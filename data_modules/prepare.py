"""`lit-ovis prepare`: images + captions (folder, manifest, or the synthetic engine) -> one LitData
dataset per aspect-ratio bucket of VAE latents (and optionally text embeddings), plus reports.

Steps: decode and validate -> filter (min side, aspect ratio, captions) -> perceptual hash -> bucket for
the target area -> resize + centre-crop -> VAE-encode in batches -> (text-encode) -> near-duplicate
removal (pHash Hamming distance <= --dedup-threshold, first copy kept) -> write.

Several resolutions share one --output-dir (`<out>/<resolution>/<WxH>/`, see data_modules/layout.py).

Restartable and cache-correct: inputs are processed in fixed shards; each finished shard is saved
atomically as `<out>/_work/<resolution>/<key>.pt`, where the key is a hash of the shard's records
(ids, captions, file sizes and mtimes) and of every config field that changes a record's output
(resolution, filters, VAE, text encoder, storage dtype, synthetic seed). A rerun after a kill reuses
finished shards and never duplicates samples; changed inputs or settings get new keys and are redone.
The final write streams the shards one at a time into the bucket datasets. A rerun whose inputs and
settings are unchanged (same fingerprint in `<out>/<resolution>/report.json`) does nothing.
"""

from __future__ import annotations

import argparse
import codecs
import hashlib
import io
import json
import os
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data_modules.buckets import assign_bucket, make_buckets, resize_to_bucket
from data_modules.dedup import MAX_THRESHOLD, NearDuplicateIndex
from data_modules.layout import FORMAT, REPORT, WORK, read_json, update_root_report, work_dir
from data_modules.records import (Record, Skip, add_source_options, check_caption, load_image, records_from_options,
                                  synthetic_records)  # synthetic_records: re-exported for callers of prepare
from data_modules.writer import BucketedWriter, chunk_bytes_for, trim_embeddings
from lit_ovis.errors import ConfigError, DataError, OneLineArgumentParser
from lit_ovis.files import atomic_write
from lit_ovis.options import add_options, from_options

# Config fields that change what one record turns into: part of every shard's cache key.
RECORD_FIELDS = ("resolution", "min_side", "min_aspect", "max_aspect", "max_caption_chars", "vae", "text_encoder",
                 "max_sequence_length", "storage_dtype", "seed", "synthetic_size")
# Fields that only change which processed samples are written: part of the dataset fingerprint.
FINAL_FIELDS = ("dedup", "dedup_threshold")


@dataclass
class PrepareConfig:
    """Settings of `lit-ovis prepare` (each field is a --kebab-case option)."""

    output_dir: str
    """Root of the prepared datasets; each resolution goes to <output_dir>/<resolution>/."""
    resolution: int = 256
    """Target side in px: buckets have an area of about resolution^2, sides multiples of 16."""
    min_side: int = 64
    """Skip images whose short side is smaller (px)."""
    min_aspect: float = 0.25
    """Smallest aspect ratio (width / height) kept; also the narrowest bucket."""
    max_aspect: float = 4.0
    """Largest aspect ratio (width / height) kept; also the widest bucket."""
    max_caption_chars: int = 2000
    """Skip captions longer than this many characters."""
    dedup: bool = True
    """Remove near-duplicate images (perceptual hashes), keeping the first copy."""
    dedup_threshold: int = 4
    """Near-duplicate: pHashes within this many of 64 bits (0 = identical hashes only)."""
    shard_size: int = 256
    """Records per restart-cache shard (a killed run redoes at most one shard)."""
    batch_size: int = 16
    """Images per VAE / text-encoder batch."""
    num_workers: int = 2
    """Decode/render processes (1 = in this process)."""
    vae: str = "tiny"
    """VAE preset ("tiny", "flux") or a folder / hub id with vae/."""
    text_encoder: str | None = None
    """Precompute prompt embeddings with this encoder (preset, folder or hub id); unset: store captions only."""
    max_sequence_length: int = 256
    """Text-encoder length of the precomputed embeddings."""
    storage_dtype: str = "float16"
    """torch dtype name of the latents / embeddings on disk."""
    device: str = "auto"
    """Device for the encoders: "auto" (a GPU when present), "cpu", "cuda:0", ..."""
    seed: int = 0
    """Seed of the synthetic text-rendering engine."""
    synthetic_size: int | None = None
    """Base side of synthetic renders (unset: the resolution, at least twice min_side)."""
    write_buffer_mb: int = 1024
    """RAM for the final write's open chunk buffers, shared by all buckets."""
    caption_encoding: str = "utf-8"
    """Encoding of sidecar captions and manifests without a byte-order mark (e.g. gb18030); text that is not
    valid in it is skipped and counted (`caption_encoding`, `manifest_encoding`), never decoded lossily."""

    def check(self) -> None:
        if self.resolution < 16 or self.resolution % 16:
            raise ConfigError(f"--resolution must be a positive multiple of 16 (got {self.resolution})")
        if not 0 <= self.dedup_threshold <= MAX_THRESHOLD:
            raise ConfigError(f"--dedup-threshold must be between 0 and {MAX_THRESHOLD} bits of 64 (got {self.dedup_threshold}); 4 is typical")
        if self.shard_size < 1 or self.batch_size < 1:
            raise ConfigError(f"--shard-size and --batch-size must be >= 1 (got {self.shard_size}, {self.batch_size})")
        if not 0 < self.min_aspect <= 1 <= self.max_aspect:
            raise ConfigError(f"--min-aspect/--max-aspect must satisfy 0 < min <= 1 <= max (got {self.min_aspect}, {self.max_aspect})")
        try:
            codecs.lookup(self.caption_encoding)
        except LookupError:
            raise ConfigError(f"--caption-encoding: unknown encoding '{self.caption_encoding}'; use e.g. utf-8, gb18030, latin-1") from None


# ------------------------------------------------------------------------------------ per-record work
def _process(record: Record, cfg: PrepareConfig, buckets: list[tuple[int, int]]):
    """Decode/render, validate, hash and crop one record. Returns (sample dict, None) or (None, reason)."""
    import imagehash

    converted: list[str] = []
    try:
        if record.skip:
            raise Skip(record.skip)
        if record.synthetic_index is not None:
            engine = _engine(cfg)
            rendered = engine.render(record.synthetic_index)
            image, caption = rendered.image, rendered.caption
            language, target_text = rendered.language, rendered.text
        else:
            image = load_image(record.path, converted)
            caption, language, target_text = record.caption, record.language, record.target_text
        caption = check_caption(caption, cfg.max_caption_chars)
        if min(image.size) < cfg.min_side:
            raise Skip("too_small")
        ar = image.width / image.height
        if not cfg.min_aspect <= ar <= cfg.max_aspect:
            raise Skip("aspect_ratio")
        # Synthetic renders are distinct by construction (different text in a similar layout can hash
        # within a few bits), so only real images take part in near-duplicate removal.
        phash = None if record.synthetic_index is not None else int(str(imagehash.phash(image)), 16)
        bucket = assign_bucket(image.width, image.height, buckets)
        pixels = np.asarray(resize_to_bucket(image, bucket), dtype=np.uint8)
    except Skip as skip:
        return None, skip.reason
    return {
        "id": record.id, "caption": caption, "language": language, "target_text": target_text,
        "bucket": bucket, "phash": phash, "pixels": pixels, "converted": converted,
    }, None


_ENGINES: dict[tuple[int, int], object] = {}


def _engine(cfg: PrepareConfig):
    # Render at least twice the min side so every aspect ratio passes the size filter.
    key = (cfg.seed, cfg.synthetic_size or max(cfg.resolution, 2 * cfg.min_side))
    if key not in _ENGINES:  # keyed: one process may prepare several resolutions / seeds
        from data_modules.synthetic.engine import TextRenderingEngine

        _ENGINES[key] = TextRenderingEngine(seed=key[0], base_size=key[1])
    return _ENGINES[key]


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
            # Padding rows are exactly zero in the pipeline; keep only the valid prefix on disk.
            out.extend(trim_embeddings(e).to(self.storage) for e in embeds)
        return out


# ------------------------------------------------------------------------------------------ shards
def _record_identity(r: Record) -> list:
    stat: list = [None, None]
    if r.path is not None:
        try:
            st = os.stat(r.path)
            stat = [st.st_size, st.st_mtime_ns]  # an edited image file gets a new key
        except OSError:
            pass
    skip = [r.skip] if r.skip else []  # only when set: keys of ordinary records stay as they were
    return [r.id, r.caption, r.path, r.language, r.target_text, r.synthetic_index, *stat, *skip]


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()[:32]


def shard_keys(records: list[Record], cfg: PrepareConfig) -> list[str]:
    """Cache key of each input shard: its records and every config field that changes their output."""
    fields = {k: getattr(cfg, k) for k in RECORD_FIELDS}
    return [_digest([FORMAT, fields, [_record_identity(r) for r in records[i : i + cfg.shard_size]]])
            for i in range(0, len(records), cfg.shard_size)]


def dataset_fingerprint(keys: list[str], cfg: PrepareConfig) -> str:
    return _digest([FORMAT, {k: getattr(cfg, k) for k in FINAL_FIELDS}, keys])


def _atomic_torch_save(obj, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getvalue())


def _run_shard(records: list[Record], cfg: PrepareConfig, buckets, encoders: Encoders, pool) -> dict:
    jobs = [(r, cfg, buckets) for r in records]
    results = list(pool.map(_process_star, jobs, chunksize=4)) if pool is not None else [_process_star(j) for j in jobs]
    skipped = Counter(reason for _, reason in results if reason)
    kept = [s for s, _ in results if s is not None]
    converted = Counter(c for s in kept for c in s["converted"])
    by_bucket: dict[tuple, list[dict]] = {}
    for s in kept:
        by_bucket.setdefault(s["bucket"], []).append(s)
    samples = []
    for bucket, group in by_bucket.items():
        latents = encoders.encode_images([s["pixels"] for s in group])
        embeds = encoders.encode_texts([s["caption"] for s in group]) if encoders.text_encoder is not None else [None] * len(group)
        for s, z, e in zip(group, latents, embeds):
            # Every stored tensor is finite (an overflow in fp16 storage, a VAE/encoder NaN): else skip it here.
            bad = next((name for name, t in (("latents", z), ("prompt_embeds", e)) if t is not None and not torch.isfinite(t).all()), None)
            if bad:
                skipped[f"non_finite_{bad}"] += 1
                continue
            s = {k: v for k, v in s.items() if k not in ("pixels", "converted")}
            s["latents"], s["prompt_embeds"] = z, e
            samples.append(s)
    order = {r.id: i for i, r in enumerate(records)}
    samples.sort(key=lambda s: order[s["id"]])  # deterministic order independent of bucket grouping
    return {"samples": samples, "skipped": dict(skipped), "inputs": len(records), "converted": dict(converted)}


class _DedupingWriter:
    """Streams prepared shards, in input order, into the bucketed writer, dropping near-duplicates.

    Memory: one shard (its tensors memory-mapped), the writers' chunk buffers (`write_buffer_mb`) and the
    near-duplicate index (ints), independent of the dataset size."""

    def __init__(self, cfg: PrepareConfig, n_buckets: int):
        self.writer = BucketedWriter(cfg.output_dir, cfg.resolution, chunk_bytes_for(cfg.write_buffer_mb, n_buckets))
        self.index = NearDuplicateIndex(cfg.dedup_threshold) if cfg.dedup else None
        self.skipped: Counter = Counter()
        self.converted: Counter = Counter()
        self.inputs = 0

    def add_shard(self, path: Path) -> None:
        # A function scope per shard: nothing of it outlives the call.
        shard = torch.load(path, weights_only=True, mmap=True)
        self.inputs += shard["inputs"]
        self.skipped.update(shard["skipped"])
        self.converted.update(shard.get("converted", {}))
        for s in shard["samples"]:
            if self.index is not None and s["phash"] is not None and not self.index.add(s["phash"]):
                self.skipped["duplicate"] += 1
                continue
            item = {k: s[k] for k in ("id", "caption", "language", "target_text", "latents")}
            if s["prompt_embeds"] is not None:
                item["prompt_embeds"] = s["prompt_embeds"]
            self.writer.add(s["bucket"], item)


def prepare(records: list[Record], cfg: PrepareConfig, progress: bool = True) -> dict:
    """Prepare `records` at `cfg.resolution` into `cfg.output_dir`; returns that resolution's report."""
    cfg.check()
    out = Path(cfg.output_dir)
    work = work_dir(out, cfg.resolution)
    work.mkdir(parents=True, exist_ok=True)
    buckets = make_buckets(cfg.resolution, cfg.min_aspect, cfg.max_aspect)
    shards = [records[i : i + cfg.shard_size] for i in range(0, len(records), cfg.shard_size)]
    keys = shard_keys(records, cfg)
    fingerprint = dataset_fingerprint(keys, cfg)
    final = out / str(cfg.resolution)

    done = read_json(final / REPORT)
    if done and done.get("fingerprint") == fingerprint and all((final / b / "index.json").exists() for b in done["buckets"]):
        update_root_report(out)
        return {**done, "processed_this_run": 0, "reused_shards": len(keys), "seconds_this_run": 0.0}

    paths = [work / f"{key}.pt" for key in keys]
    todo = [k for k, path in enumerate(paths) if not path.exists()]
    start = time.perf_counter()
    if todo:
        encoders = Encoders(cfg)
        pool = ProcessPoolExecutor(cfg.num_workers) if cfg.num_workers > 1 else None
        try:
            bar = tqdm(total=sum(len(shards[k]) for k in todo), desc=f"prepare {cfg.resolution}", unit="img", disable=not progress, file=sys.stderr)
            for k in todo:
                _atomic_torch_save(_run_shard(shards[k], cfg, buckets, encoders, pool), paths[k])
                bar.update(len(shards[k]))
            bar.close()
        finally:
            if pool is not None:
                pool.shutdown()

    written = _DedupingWriter(cfg, len(buckets))
    for path in paths:
        written.add_shard(path)
    buckets_written = written.writer.buckets
    report = written.writer.finish({  # the report travels inside the dataset swap; the root report is rebuilt
        "inputs": written.inputs,
        "kept": sum(buckets_written.values()),
        "skipped": dict(sorted(written.skipped.items())),
        "converted": dict(sorted(written.converted.items())),
        "buckets": buckets_written,
        "has_prompt_embeds": bool(cfg.text_encoder),
        "fingerprint": fingerprint,
        "shards": len(keys),
        "dedup": {"enabled": cfg.dedup, "threshold_bits": cfg.dedup_threshold, "bands": cfg.dedup_threshold + 1,
                  "hash_comparisons": written.index.comparisons if written.index is not None else 0},
        "config": asdict(cfg),
        "processed_this_run": sum(len(shards[k]) for k in todo),
        "reused_shards": len(keys) - len(todo),
        "seconds_this_run": round(time.perf_counter() - start, 3),
    })
    current = {p.name for p in paths}
    for stale in [*work.glob("*.pt"), *work.glob(".*.tmp-*")]:  # other inputs/settings; saves cut by a kill
        if stale.name not in current:
            stale.unlink(missing_ok=True)
    for legacy in (out / WORK).glob("shard-*.pt"):  # format-1 cache, keyed by shard index only: never valid
        legacy.unlink(missing_ok=True)
    return report


def main(argv: list[str] | None = None) -> int:
    p = OneLineArgumentParser(prog="lit-ovis prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_options(p)
    add_options(p, PrepareConfig)
    args = p.parse_args(argv)
    cfg = from_options(PrepareConfig, args)
    try:
        cfg.check()  # before reading inputs: --caption-encoding decides how captions are read
        records = records_from_options(args, cfg.caption_encoding)
        report = prepare(records, cfg)
    except (DataError, ConfigError, OSError) as err:  # OSError: an unwritable output folder, a full disk
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenProcessPool:
        print(f"error: a decoding worker process died (killed by the system, e.g. out of memory on a huge image); "
              f"finished shards are kept in {cfg.output_dir}/{WORK}: rerun, with --num-workers 1 to use less memory", file=sys.stderr)
        return 2
    print(json.dumps({k: report[k] for k in ("resolution", "inputs", "kept", "skipped", "converted", "buckets")}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
