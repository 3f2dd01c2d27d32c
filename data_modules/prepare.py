"""`lit-ovis prepare`: images + captions (folder, manifest, WebDataset tars, Parquet files, or the synthetic engine)
-> one LitData dataset per aspect-ratio bucket of VAE latents (and optionally text embeddings or caption tokens),
plus reports.

Steps: decode and validate -> filter (metadata, min side, aspect ratio, captions) -> perceptual hash -> bucket
for the target area -> resize + centre-crop -> VAE-encode in batches -> (text-encode / tokenize) -> near-duplicate
removal (pHash Hamming distance <= --dedup-threshold, first copy kept, across all shards) -> write.

Several resolutions share one --output-dir (`<out>/<resolution>/<WxH>/`, see data_modules/layout.py).

Inputs are an ordered list of units (data_modules/sources.py: `--shard-size` records of a list source, one tar,
one Parquet row group). Restartable and cache-correct: each finished unit is saved atomically as
`<out>/_work/<resolution>/<key>.pt` (a container's parts as `<key>-<k>.pt`), where the key is a hash of the
unit's records (ids, captions, file sizes and mtimes) or of the container file's identity, and of every config
field that changes a record's output (resolution, filters, VAE, text encoder, storage dtype, synthetic seed). A
rerun after a kill reuses finished units and never duplicates samples; changed inputs or settings get new keys
and are redone. A rerun whose inputs and settings are unchanged (same fingerprint in
`<out>/<resolution>/report.json`) does nothing.

Sharded (data_modules/ranks.py): rank r of W encodes units r, r + W, ...; rank 0 then reads every unit's hashes
in input order (global near-duplicate removal, the same result as one process), every rank writes its own units'
kept samples, and LitData's merge joins the ranks' indexes. A split without a process group (--num-shards /
--shard-index, a SLURM array) stops after encoding; `--merge true` writes the dataset afterwards.
"""

from __future__ import annotations

import argparse
import codecs
import hashlib
import io
import itertools
import json
import os
import sys
import shutil
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from data_modules.buckets import assign_bucket, make_buckets, resize_to_bucket
from data_modules.dedup import MAX_THRESHOLD, NearDuplicateIndex
from data_modules.layout import FORMAT, REPORT, WORK, read_json, temp_dir, update_root_report, work_dir
from data_modules.ranks import Collective, GlooCollective, ShardSpec, everywhere, local_rank, on_rank0, shard_spec
from data_modules.records import (Record, Skip, add_source_options, check_caption, decode_image, load_image,
                                  synthetic_records)  # synthetic_records: re-exported for callers of prepare
from data_modules.sources import Source, Unit, as_source, owned, source_from_options
from data_modules import storage_plan
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
    """Text-encoder length of the precomputed embeddings (or stored caption tokens)."""
    template_cut: str = "pipeline"
    """Template tokens cut from the encoder's output, as the training run's --model.encoders.template_cut:
    "pipeline" (OvisImagePipeline's 28) or "template" (the tokenizer's own template length)."""
    text_storage: str | None = None
    """What is stored for each caption besides its text: "embeddings" (precomputed with --text-encoder), "tokens"
    (the templated prompt's token ids from --text-encoder's tokenizer, about 1/1000 of the embeddings' size:
    training encodes them online), or "captions" (text only, encoded online). Unset: embeddings with
    --text-encoder, else captions."""
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

    caption_field: str = "caption"
    """Caption of a record: the manifest / Parquet column, the tar sample's member extension or .json key
    (falling back to its .txt member)."""
    image_field: str = "image"
    """Parquet column holding the image (bytes, a Hugging Face image struct, or a path)."""
    metadata_filters: str | None = None
    """Keep only records whose metadata (manifest keys, tar .json, Parquet columns) passes every term, e.g.
    "aesthetic>=5,punsafe<0.5,width>=512"; failures are counted as filter_<key> / missing_<key>."""
    num_shards: int | None = None
    """Split the inputs into this many shards, one per process (unset: from RANK/WORLD_SIZE, a SLURM array
    or srun tasks; else 1). With an explicit split or an array, run once more with --merge afterwards."""
    shard_index: int | None = None
    """Which shard this process prepares, 0 .. num_shards - 1."""
    merge: bool = False
    """Encode nothing: deduplicate and write the dataset from every shard's finished work (after the shards of
    an explicit split or a SLURM array). A torchrun / srun group merges by itself."""
    wait_timeout_s: float = 86400.0
    """How long a rank of a group waits for the others (e.g. for the slowest shard to finish encoding)."""
    plan_only: bool = False
    """Print the storage plan (projected output size vs free space) and stop."""
    keep_work: bool = True
    """Keep the restart cache (<output_dir>/_work/) after the dataset is written (false frees its space)."""

    def check(self) -> None:
        if self.num_shards is not None and self.num_shards < 1:
            raise ConfigError(f"--num-shards must be >= 1 (got {self.num_shards})")
        if self.wait_timeout_s <= 0:
            raise ConfigError(f"--wait-timeout-s must be > 0 (got {self.wait_timeout_s})")
        if self.resolution < 16 or self.resolution % 16:
            raise ConfigError(f"--resolution must be a positive multiple of 16 (got {self.resolution})")
        if not 0 <= self.dedup_threshold <= MAX_THRESHOLD:
            raise ConfigError(f"--dedup-threshold must be between 0 and {MAX_THRESHOLD} bits of 64 (got {self.dedup_threshold}); 4 is typical")
        if self.shard_size < 1 or self.batch_size < 1:
            raise ConfigError(f"--shard-size and --batch-size must be >= 1 (got {self.shard_size}, {self.batch_size})")
        if not 0 < self.min_aspect <= 1 <= self.max_aspect:
            raise ConfigError(f"--min-aspect/--max-aspect must satisfy 0 < min <= 1 <= max (got {self.min_aspect}, {self.max_aspect})")
        if self.template_cut not in ("pipeline", "template"):
            raise ConfigError(f"--template-cut must be pipeline or template (got {self.template_cut})")
        if self.text_storage not in (None, *TEXT_STORAGE):
            raise ConfigError(f"--text-storage must be one of {', '.join(TEXT_STORAGE)} (got {self.text_storage})")
        if self.text_storage in ("embeddings", "tokens") and not self.text_encoder:
            raise ConfigError(f"--text-storage {self.text_storage} needs --text-encoder (whose {'weights' if self.text_storage == 'embeddings' else 'tokenizer'} "
                              "it uses); pass e.g. --text-encoder tiny or a pipeline folder, or --text-storage captions")
        try:
            codecs.lookup(self.caption_encoding)
        except LookupError:
            raise ConfigError(f"--caption-encoding: unknown encoding '{self.caption_encoding}'; use e.g. utf-8, gb18030, latin-1") from None


    @property
    def stored_text(self) -> str:
        """The resolved --text-storage."""
        return self.text_storage or ("embeddings" if self.text_encoder else "captions")


TEXT_STORAGE = ("embeddings", "tokens", "captions")


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
            image = decode_image(record.data, converted) if record.data is not None else load_image(record.path, converted)
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

        if cfg.device == "auto":  # each rank of a node on its own GPU
            self.device = torch.device(f"cuda:{local_rank() % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(cfg.device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.vae = build_vae(cfg.vae, dtype=dtype).to(self.device)
        self.text_encoder = self.tokenizer = None
        if cfg.stored_text == "embeddings":
            from lit_ovis.models.text_encoder import build_text_encoder

            self.text_encoder = build_text_encoder(cfg.text_encoder, cfg.max_sequence_length, dtype=dtype,
                                                   template_cut=cfg.template_cut).to(self.device)
        elif cfg.stored_text == "tokens":
            from lit_ovis.models.text_encoder import load_tokenizer

            from lit_ovis.models.text_encoder import prefix_tokens_for

            self.tokenizer = load_tokenizer(cfg.text_encoder)  # no weights: the tokenizer alone
            self.prefix_tokens = prefix_tokens_for(self.tokenizer, cfg.template_cut)
        self.max_sequence_length = cfg.max_sequence_length
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

    def encode_tokens(self, captions: list[str]) -> list[torch.Tensor]:
        """The token ids the text encoder reads for each caption (template included, unpadded), int32."""
        from lit_ovis.models.text_encoder import prompt_token_ids

        return [torch.tensor(ids, dtype=torch.int32) for ids in prompt_token_ids(self.tokenizer, captions, self.max_sequence_length,
                                                                                    self.prefix_tokens)]


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
    data = [hashlib.sha256(r.data).hexdigest()] if r.data is not None else []
    return [r.id, r.caption, r.path, r.language, r.target_text, r.synthetic_index, *stat, *skip, *data]


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()[:32]


MODEL_FILES = ("config.json", "*.safetensors", "*.bin")


def model_files_identity(source: str | None) -> list | None:
    """Name, size and mtime of a local model folder's config and weight files (None for presets and hub ids):
    an encoder retrained in place (e.g. `lit-ovis train-autoencoder --overwrite`) changes every shard key."""
    path = Path(source) if source else None
    if path is None or not path.is_dir():
        return None
    files = sorted({f for pattern in MODEL_FILES for f in path.rglob(pattern) if f.is_file()})
    return [[str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _record_fields(cfg: PrepareConfig) -> dict:
    fields = {k: getattr(cfg, k) for k in RECORD_FIELDS}
    if cfg.stored_text == "tokens":  # only then: the keys of every earlier cache stay valid
        fields["text_storage"] = "tokens"
    if cfg.template_cut != "pipeline" and cfg.stored_text != "captions":  # likewise: the default adds no key
        fields["template_cut"] = cfg.template_cut
    for name in ("vae", "text_encoder"):  # only local folders add a key, so preset/hub caches keep theirs
        identity = model_files_identity(getattr(cfg, name))
        if identity is not None:
            fields[f"{name}_files"] = identity
    return fields


def shard_keys(records: list[Record], cfg: PrepareConfig) -> list[str]:
    """Cache key of each input shard: its records and every config field that changes their output."""
    fields = _record_fields(cfg)
    return [_digest([FORMAT, fields, [_record_identity(r) for r in records[i : i + cfg.shard_size]]])
            for i in range(0, len(records), cfg.shard_size)]


# Settings that change what a container (tar, Parquet row group) yields: part of its units' keys.
READER_FIELDS = ("caption_field", "image_field", "metadata_filters", "caption_encoding", "shard_size")


def unit_key(unit: Unit, cfg: PrepareConfig, fields: dict | None = None) -> str:
    """Cache key of a unit: a list unit by its records' content (`shard_keys`), a container unit by the file's
    identity (URL, size, version) and the settings that change what it yields. `fields`: `_record_fields(cfg)`,
    computed once by callers that key many units (it reads local model folders' file stats)."""
    fields = _record_fields(cfg) if fields is None else fields
    if unit.records is not None:
        return _digest([FORMAT, fields, [_record_identity(r) for r in unit.records]])
    return _digest([FORMAT, fields, {k: getattr(cfg, k) for k in READER_FIELDS}, unit.identity])


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
        tokens = encoders.encode_tokens([s["caption"] for s in group]) if encoders.tokenizer is not None else [None] * len(group)
        for s, z, e, t in zip(group, latents, embeds, tokens):
            # Every stored tensor is finite (an overflow in fp16 storage, a VAE/encoder NaN): else skip it here.
            bad = next((name for name, t in (("latents", z), ("prompt_embeds", e)) if t is not None and not torch.isfinite(t).all()), None)
            if bad:
                skipped[f"non_finite_{bad}"] += 1
                continue
            s = {k: v for k, v in s.items() if k not in ("pixels", "converted")}
            s["latents"], s["prompt_embeds"] = z, e
            if t is not None:
                s["prompt_token_ids"] = t
            samples.append(s)
    order = {r.id: i for i, r in enumerate(records)}
    samples.sort(key=lambda s: order[s["id"]])  # deterministic order independent of bucket grouping
    return {"samples": samples, "skipped": dict(skipped), "inputs": len(records), "converted": dict(converted)}


# ------------------------------------------------------------------------------------------ units
def _cached_shards(path: Path) -> Iterator[dict]:
    """The finished shards of one unit's cache, in input order (a container unit's cache lists its parts)."""
    head = torch.load(path, weights_only=True, mmap=True)
    if "parts" not in head:
        yield head
        return
    for name in head["parts"]:
        yield torch.load(path.parent / name, weights_only=True, mmap=True)


def _prepare_unit(unit: Unit, path: Path, cfg: PrepareConfig, buckets, encoders: Callable[[], Encoders], pool, bar) -> int:
    """Encode one unit into its cache `path` (parts of `shard_size` records for a container, each saved as it is
    done, so a kill redoes at most one part); returns the records processed now."""
    if unit.records is not None:
        _atomic_torch_save(_run_shard(unit.records, cfg, buckets, encoders(), pool), path)
        bar.update(len(unit.records))
        return len(unit.records)
    processed, parts, stream = 0, [], unit.read()
    for k in itertools.count():
        chunk = list(itertools.islice(stream, cfg.shard_size))
        if not chunk:
            break
        part = path.with_name(f"{path.stem}-{k}.pt")
        if not part.exists():
            _atomic_torch_save(_run_shard(chunk, cfg, buckets, encoders(), pool), part)
            processed += len(chunk)
        bar.update(len(chunk))
        parts.append(part.name)
    _atomic_torch_save({"parts": parts}, path)
    return processed


def _listing(source: Source, cfg: PrepareConfig, col: Collective) -> tuple[list[Unit], list[str]]:
    """Every unit of the input, without its records (a list unit is read again when it is encoded, so a manifest is
    streamed, never held whole), and the keys of this rank's units (each rank hashes its share)."""
    units, keys, fields = [], [], _record_fields(cfg)
    for u in source.units(cfg.shard_size):
        if u.index % col.world == col.rank:
            keys.append(unit_key(u, cfg, fields))
        units.append(u if u.records is None else Unit(u.index, u.name, size=u.size))
    return units, keys


def _reread(source: Source, units: list[Unit], todo: list[int], keys: list[str], cfg: PrepareConfig) -> Iterator[Unit]:
    """The units `todo` with their records: containers as listed, list units read again (and checked against
    their listed key) in one pass that stops after the last one needed."""
    if all(units[i].opener is not None for i in todo):
        yield from (units[i] for i in todo)
        return
    remaining, fields = set(todo), _record_fields(cfg)
    for u in source.units(cfg.shard_size):
        if u.index not in remaining:
            continue
        if u.records is not None and unit_key(u, cfg, fields) != keys[u.index]:
            raise DataError(f"{u.name}: the input changed while prepare was running (these records differ from the listing); rerun prepare")
        remaining.discard(u.index)
        yield u
        if not remaining:
            return


def _encode_owned(source: Source, units: list[Unit], keys: list[str], paths: list[Path], spec: ShardSpec, cfg: PrepareConfig,
                  buckets, progress: bool) -> tuple[int, int]:
    """Encode this shard's units that have no cache yet; (records processed, units reused)."""
    mine = [u for u in owned(units, spec.index, spec.count)]
    todo = [u for u in mine if not paths[u.index].exists()]
    if not todo:
        return 0, len(mine)
    built: list[Encoders] = []

    def encoders() -> Encoders:  # built on first need: a container whose parts are all cached needs none
        if not built:
            built.append(Encoders(cfg))
        return built[0]

    pool = ProcessPoolExecutor(cfg.num_workers) if cfg.num_workers > 1 else None
    processed = 0
    try:
        total = sum(u.size for u in todo) if all(u.size is not None for u in todo) else None
        desc = f"prepare {cfg.resolution}" + (f" {spec.describe()}" if spec.count > 1 else "")
        with tqdm(total=total, desc=desc, unit="img", disable=not progress, file=sys.stderr) as bar:
            for u in _reread(source, units, [u.index for u in todo], keys, cfg):
                processed += _prepare_unit(u, paths[u.index], cfg, buckets, encoders, pool, bar)
    finally:
        if pool is not None:
            pool.shutdown()
    return processed, len(mine) - len(todo)


def _dedup_pass(paths: list[Path], cfg: PrepareConfig) -> dict:
    """Read every unit's cache in input order (hashes and counts only; tensors stay on disk): which samples are
    near-duplicates of an earlier one (global: across units and shards, first copy kept, as in one process), and
    the report's counts. Samples are named (unit, shard, position), so duplicate record ids cannot collide."""
    index = NearDuplicateIndex(cfg.dedup_threshold) if cfg.dedup else None
    dropped: set[tuple[int, int, int]] = set()
    skipped, converted, inputs = Counter(), Counter(), 0
    for u, path in enumerate(paths):
        for p, shard in enumerate(_cached_shards(path)):
            inputs += shard["inputs"]
            skipped.update(shard["skipped"])
            converted.update(shard.get("converted", {}))
            hashes = [s["phash"] for s in shard["samples"]]
            del shard  # nothing of a shard outlives its turn: the next one loads into free memory
            for k, h in enumerate(hashes):
                if index is not None and h is not None and not index.add(h):
                    dropped.add((u, p, k))
    skipped["duplicate"] += len(dropped)
    if not skipped["duplicate"]:
        del skipped["duplicate"]
    return {"dropped": dropped, "skipped": dict(sorted(skipped.items())), "converted": dict(sorted(converted.items())),
            "inputs": inputs, "comparisons": index.comparisons if index is not None else 0}


def _write_owned(writer: BucketedWriter, units: list[Unit], paths: list[Path], spec: ShardSpec, dropped: set) -> dict[str, int]:
    """Stream this rank's units' kept samples, in input order, into its part of the dataset; its items per bucket.
    Memory: one shard (tensors memory-mapped) and the chunk buffers, independent of the dataset size."""
    for u in owned(units, spec.index, spec.count):
        for p, shard in enumerate(_cached_shards(paths[u.index])):
            _write_shard(writer, shard, u.index, p, dropped)
            del shard  # nothing of a shard outlives its turn: the next one loads into free memory
    return writer.close()


def _write_shard(writer: BucketedWriter, shard: dict, unit: int, part: int, dropped: set) -> None:
    for k, s in enumerate(shard["samples"]):
        if (unit, part, k) in dropped:
            continue
        item = {key: s[key] for key in ("id", "caption", "language", "target_text", "latents")}
        if s["prompt_embeds"] is not None:
            item["prompt_embeds"] = s["prompt_embeds"]
        if "prompt_token_ids" in s:
            item["prompt_token_ids"] = s["prompt_token_ids"]
        writer.add(s["bucket"], item)


def _storage_plan(source: Source, cfg: PrepareConfig, work: Path) -> storage_plan.StoragePlan:
    samples, counted = source.count()
    hidden, _ = storage_plan.text_encoder_hidden_size(cfg.text_encoder)
    text_storage = cfg.stored_text
    cached = sum(1 for _ in work.glob("*.pt")) * cfg.shard_size if work.is_dir() else 0
    return storage_plan.StoragePlan(
        samples=samples or 0, counted=counted,
        latent_bytes=storage_plan.latent_bytes(cfg.resolution, cfg.min_aspect, cfg.max_aspect, cfg.storage_dtype),
        text_bytes=storage_plan.text_bytes(text_storage, cfg.max_sequence_length, hidden, cfg.storage_dtype),
        text_storage=text_storage, cache_done_fraction=min(1.0, cached / samples) if samples else 1.0,
        free=storage_plan.free_bytes(cfg.output_dir))


def _collective(spec: ShardSpec, cfg: PrepareConfig, given: Collective | None) -> Collective:
    if given is not None:
        return given
    return GlooCollective(spec, cfg.wait_timeout_s) if spec.grouped else Collective()


def prepare(inputs: list[Record] | Source, cfg: PrepareConfig, progress: bool = True, shard: ShardSpec | None = None,
            collective: Collective | None = None) -> dict:
    """Prepare `inputs` at `cfg.resolution` into `cfg.output_dir`; returns that resolution's report.

    Sharded (`shard`, else from the options / launcher environment: data_modules/ranks.py): this process encodes
    its units only. A group (torchrun, srun) then deduplicates and writes together, rank 0 publishing; a
    shard of an explicit split or array stops after encoding (its report says so) and `--merge` writes."""
    cfg.check()
    source = as_source(inputs)
    if shard is not None:
        spec = shard
    else:  # a merge takes no --shard-index: it runs alone, or as a torchrun / srun group that writes together
        spec = shard_spec(None, None) if cfg.merge else shard_spec(cfg.num_shards, cfg.shard_index)
    if cfg.merge and not spec.grouped:  # the merge after a split or an array: one process writes everything
        spec = ShardSpec()
    col = _collective(spec, cfg, collective)
    try:
        return _prepare(source, cfg, progress, spec, col)
    finally:
        if collective is None:
            col.close()


def _prepare(source: Source, cfg: PrepareConfig, progress: bool, spec: ShardSpec, col: Collective) -> dict:
    out = Path(cfg.output_dir)
    work = work_dir(out, cfg.resolution)
    final = out / str(cfg.resolution)
    buckets = make_buckets(cfg.resolution, cfg.min_aspect, cfg.max_aspect)

    if not cfg.merge:
        def plan() -> tuple[str, str | None]:
            p = _storage_plan(source, cfg, work)
            return p.describe(cfg.resolution), p.refusal(cfg.output_dir)

        described, refusal = on_rank0(col, plan, "project the output size")
        if col.rank == 0 and (progress or cfg.plan_only):
            print(described, file=sys.stderr)
        if cfg.plan_only:
            if col.rank == 0 and refusal:
                print(f"a run would stop here: {refusal}", file=sys.stderr)
            return {"plan": described, "fits": refusal is None}
        if refusal:
            raise DataError(refusal)

    listed: list[list[Unit]] = []

    def listing() -> list[str]:
        units, keys = _listing(source, cfg, col)
        listed.append(units)
        return keys

    keys = everywhere(col, listing, "list the inputs")
    units = listed[0]
    keys = [keys[u.index % col.world][u.index // col.world] for u in units]  # every rank's keys, in unit order
    fingerprint = dataset_fingerprint(keys, cfg)
    done = read_json(final / REPORT)
    if done and done.get("fingerprint") == fingerprint and all((final / b / "index.json").exists() for b in done["buckets"]):
        if col.rank == 0:
            update_root_report(out)
        return {**done, "processed_this_run": 0, "reused_shards": len(keys), "seconds_this_run": 0.0}

    work.mkdir(parents=True, exist_ok=True)
    paths = [work / f"{key}.pt" for key in keys]
    start = time.perf_counter()
    processed, reused = 0, 0
    if not cfg.merge:
        processed, reused = _encode_owned(source, units, keys, paths, spec, cfg, buckets, progress)
    if not spec.grouped and spec.count > 1:  # one shard of a split: the merge run writes the dataset
        mine = [u for u in owned(units, spec.index, spec.count)]
        return {"resolution": cfg.resolution, "shard": spec.describe(), "units": len(mine), "inputs_listed": len(units),
                "processed_this_run": processed, "reused_shards": reused, "seconds_this_run": round(time.perf_counter() - start, 3),
                "next": f"when every shard is done: lit-ovis prepare ... --merge true (same options, without --shard-index)"}
    counts = everywhere(col, lambda: (processed, reused), "encode their shard")
    processed, reused = sum(c[0] for c in counts), (len(units) if cfg.merge else sum(c[1] for c in counts))

    missing = [u.name for u, path in zip(units, paths) if not path.exists()]
    if missing:
        raise DataError(f"--merge: {len(missing)} of {len(units)} input units are not prepared yet (first: {missing[0]}); "
                        "finish every shard (the same command with its --shard-index) first, then rerun --merge")

    def first_pass() -> dict:
        result = _dedup_pass(paths, cfg)
        tmp = temp_dir(out, cfg.resolution)
        shutil.rmtree(tmp, ignore_errors=True)  # an interrupted earlier write
        tmp.mkdir(parents=True)
        return result

    dedup = on_rank0(col, first_pass, "deduplicate")
    writer = BucketedWriter(out, cfg.resolution, chunk_bytes_for(cfg.write_buffer_mb, len(buckets)), col.rank, col.world, fresh=False)
    parts = everywhere(col, lambda: (_write_owned(writer, units, paths, ShardSpec(col.rank, col.world), dedup["dropped"]),
                                     writer.geometry), "write their part")
    total, geometry = Counter(), {}
    for sizes, rank_geometry in parts:
        total.update(sizes)
        geometry = geometry or rank_geometry  # rank 0 may have written nothing: any rank's items tell the geometry

    def publish() -> dict:
        report = writer.publish({  # the report travels inside the dataset swap; the root report is rebuilt
            "inputs": dedup["inputs"],
            "kept": sum(total.values()),
            "skipped": dedup["skipped"],
            "converted": dedup["converted"],
            "has_prompt_embeds": cfg.stored_text == "embeddings",
            "text_storage": cfg.stored_text,
            "fingerprint": fingerprint,
            "shards": len(keys),
            "ranks": col.world,
            "dedup": {"enabled": cfg.dedup, "threshold_bits": cfg.dedup_threshold, "bands": cfg.dedup_threshold + 1,
                      "hash_comparisons": dedup["comparisons"]},
            "config": {k: v for k, v in asdict(cfg).items() if k not in ("num_shards", "shard_index", "merge", "plan_only")},
            "processed_this_run": processed,
            "reused_shards": reused,
            "seconds_this_run": round(time.perf_counter() - start, 3),
        }, dict(total), geometry)
        _clean_work(work, paths, out, cfg.keep_work)
        return report

    return on_rank0(col, publish, "publish the dataset")


def _clean_work(work: Path, paths: list[Path], out: Path, keep: bool) -> None:
    """Drop cache files of other inputs/settings and saves cut by a kill (or the whole cache: `keep` false)."""
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
        return
    current = {p.stem for p in paths}
    for stale in [*work.glob("*.pt"), *work.glob(".*.tmp-*")]:
        if stale.name.startswith(".") or stale.stem.split("-")[0] not in current:
            stale.unlink(missing_ok=True)
    for legacy in (out / WORK).glob("shard-*.pt"):  # format-1 cache, keyed by shard index only: never valid
        legacy.unlink(missing_ok=True)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="lit-ovis prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_options(p, containers=True)
    add_options(p, PrepareConfig)
    return p


def parse_config(argv: list[str]) -> tuple[argparse.Namespace, PrepareConfig]:
    """Options and settings of a prepare command line, checked (bad options exit with one line; ConfigError)."""
    args = build_parser().parse_args(argv)
    cfg = from_options(PrepareConfig, args)
    cfg.check()
    return args, cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = from_options(PrepareConfig, args)
    try:
        cfg.check()  # before reading inputs: --caption-encoding decides how captions are read
        report = prepare(source_from_options(args, cfg), cfg)
    except (DataError, ConfigError, OSError) as err:  # OSError: an unwritable output folder, a full disk
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenProcessPool:
        print(f"error: a decoding worker process died (killed by the system, e.g. out of memory on a huge image); "
              f"finished shards are kept in {cfg.output_dir}/{WORK}: rerun, with --num-workers 1 to use less memory", file=sys.stderr)
        return 2
    if "plan" in report:  # --plan-only: the plan is printed already
        return 0
    keys = ("resolution", "shard", "units", "processed_this_run", "reused_shards", "next") if "shard" in report else \
        ("resolution", "inputs", "kept", "skipped", "converted", "buckets")
    print(json.dumps({k: report[k] for k in keys}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
