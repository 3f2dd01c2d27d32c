"""Streaming DataModule over prepared, aspect-ratio-bucketed LitData datasets.

Batching: each epoch has a deterministic *batch plan* drawn from (seed, epoch): every bucket's training
samples are shuffled and cut into batches of one bucket each (so every batch has one latent shape), and
all batches are shuffled together, so buckets are drawn in proportion to their size.

What an epoch leaves out: the last `n % batch_size` samples of each bucket (after that epoch's shuffle)
do not fill a batch, and the plan is cut to a multiple of the world size (at most `world_size - 1`
batches). Every other sample is seen exactly once per epoch across all ranks and workers; the
left-out samples change from epoch to epoch, so none is lost for good.

Sharding and resume: global batch `j` of the remaining plan goes to rank `j % world_size`; the DataLoader
workers of a rank fetch its batches. Ranks step in lockstep, so every rank knows the global number of
batches consumed in the epoch; that number (with the world size and a digest of the plan) is saved in
the Lightning checkpoint. A resumed run, at the same or another world size, deals the epoch's remaining
batches round-robin to its ranks: no sample repeated or skipped.

Epochs advance when an iteration starts after the previous one handed out its last batch (Lightning
stops reading at len() and never exhausts the iterator), so every epoch gets its own shuffle.

Damaged chunk files (shorter than their index says, or missing) are found once, in setup, by comparing
file sizes with each bucket's index (data_modules/chunks.py): the records past the cut leave the plan
(reported once per chunk), the intact ones before it are still read. Corrupt records met while reading
(unreadable, missing fields, a latent of the wrong shape, NaN/Inf in any stored tensor, latents or
prompt_embeds) are replaced by the next readable record of the same bucket (same split; that sample then
appears twice in the epoch) and counted by reason (`corrupt_skipped`, `corrupt_by_reason` in the state;
the first of each reason and a summary at the end of the run are logged), so every batch keeps its size
and shape and every rank runs the same number of steps (FSDP collectives stay in lockstep).

A synthetic dataset (the demo) is built by global rank 0 alone, in setup; the other ranks wait for its
result at most `build_timeout_s` and then fail with one line naming what they waited for. DataLoader
workers that produce no batch for `worker_timeout_s` fail the same way.

Validation: `val_samples_per_bucket` holds out a fixed, seeded set of samples per bucket (never in the
training plan), or `val_root` names a separately prepared dataset. Served in a fixed order, every sample
exactly once across ranks; batches are split until their count is a multiple of the world size, so
every rank runs the same number of validation steps.

Inputs may be local paths or any URL LitData streams from (s3://, gs://, ...); remote roots are listed
from `<root>/report.json` (see data_modules/layout.py).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Sampler

from data_modules.chunks import ChunkDamage, ChunkSalvage, index_problem, scan_chunks
from data_modules.layout import BUCKET_DIR, LATENT_KEYS, REPORT, latent_geometry, read_json, report_buckets
from data_modules.rank0 import build_on_rank0
from lit_ovis.errors import ConfigError, DataError
from lit_ovis.files import is_remote

log = logging.getLogger(__name__)

TOKEN_KEY = "prompt_token_ids"
VAL_EPOCH = -1  # sampler keys with this epoch are validation / predict items: no training progress


# ------------------------------------------------------------------------------------------- discovery
def discover_buckets(root: str, resolutions: list[int] | None = None) -> list[str]:
    """Bucket dataset directories `<root>/<resolution>/<WxH>`, sorted. Hidden or temporary directories
    (an interrupted write's `.<res>.tmp`, `_work`) are never datasets."""
    wanted = None if resolutions is None else {int(r) for r in resolutions}
    if is_remote(root):
        available = report_buckets(_read_remote_report(root))
        if not available:
            raise DataError(f"{root}/{REPORT} lists no prepared resolutions; run `lit-ovis prepare --output-dir {root} ...`")
        found = {res: names for res, names in available.items() if wanted is None or res in wanted}
        base = root.rstrip("/")
        dirs = [f"{base}/{res}/{name}" for res in sorted(found) for name in found[res]]
    else:
        path = Path(root)
        if not path.exists():
            raise DataError(f"{root}: dataset not found; run `lit-ovis prepare --output-dir {root} ...` first")
        found = {}
        for index in path.glob("*/*/index.json"):
            bucket, res_dir = index.parent, index.parent.parent
            if res_dir.name.isdigit() and BUCKET_DIR.match(bucket.name) and (wanted is None or int(res_dir.name) in wanted):
                found.setdefault(int(res_dir.name), []).append(bucket.name)
        dirs = [str(path / str(res) / name) for res in sorted(found) for name in sorted(found[res])]
    missing = sorted(wanted - set(found)) if wanted is not None else []
    if missing:
        raise DataError(f"{root}: no prepared buckets for resolution(s) {missing}; run `lit-ovis prepare --output-dir {root} --resolution {missing[0]}`")
    if not dirs:
        raise DataError(f"{root}: no prepared buckets (expected <root>/<resolution>/<WxH>/index.json); run `lit-ovis prepare`")
    return dirs


def _read_remote_report(root: str) -> dict:
    import fsspec

    url = f"{root.rstrip('/')}/{REPORT}"
    try:
        with fsspec.open(url, "r") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{url} not found; a remote root needs the report written by `lit-ovis prepare` next to its buckets") from None


def bucket_sizes(bucket_dirs: list[str]) -> list[int]:
    from litdata import StreamingDataset

    return [len(StreamingDataset(d)) for d in bucket_dirs]


def bucket_key(bucket_dir: str) -> str:
    """`<resolution>/<WxH>`: a bucket's name independent of where the root lives."""
    return "/".join(bucket_dir.rstrip("/").split("/")[-2:])


def resolution_report(bucket_dir: str) -> dict | None:
    """The report of the resolution a bucket belongs to (`<root>/<resolution>/report.json`), local or remote."""
    parent = bucket_dir.rstrip("/").rsplit("/", 1)[0]
    if is_remote(parent):
        import fsspec

        try:
            with fsspec.open(f"{parent}/{REPORT}", "r") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None
    return read_json(Path(parent) / REPORT)


def latent_shape(bucket_dir: str) -> tuple[int, int, int] | None:
    """Shape every latent of a bucket must have: (channels, H / s, W / s) with the latent channels and the VAE
    factor s its resolution's report records (FLUX's 16 channels at 8x for datasets that predate the record)."""
    m = BUCKET_DIR.match(bucket_dir.rstrip("/").split("/")[-1])
    if not m:
        return None
    channels, scale = latent_geometry(resolution_report(bucket_dir))
    return channels, int(m.group(2)) // scale, int(m.group(1)) // scale


# ------------------------------------------------------------------------------------------- plans
Pool = Sequence[int]


def _pools(pools: Sequence[int | Pool]) -> list[list[int]]:
    return [list(range(p)) if isinstance(p, (int, np.integer)) else sorted(int(i) for i in p) for p in pools]


def holdout(keys: list[str], sizes: list[int], per_bucket: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """(train pools, validation pools): `per_bucket` samples of each bucket held out, chosen by a
    permutation seeded by (seed, bucket name), so the split is fixed across epochs, world sizes and
    the addition of other buckets."""
    train, val = [], []
    for key, n in zip(keys, sizes):
        order = list(range(n))
        random.Random(f"{seed}-val-{key}").shuffle(order)
        held = sorted(order[: min(max(per_bucket, 0), n)])
        heldset = set(held)
        val.append(held)
        train.append([i for i in range(n) if i not in heldset])
    return train, val


def batch_plan(pools: Sequence[int | Pool], batch_size: int, seed: int, epoch: int, drop_last: bool = True) -> list[list[tuple[int, int]]]:
    """All batches of one epoch as lists of (bucket, index); identical on every rank. A pool is a bucket
    size or the list of its usable indices."""
    rng = random.Random(f"{seed}-{epoch}")
    batches = []
    for b, pool in enumerate(_pools(pools)):
        order = list(pool)
        rng.shuffle(order)
        stop = len(order) - len(order) % batch_size if drop_last else len(order)
        batches += [[(b, i) for i in order[s : s + batch_size]] for s in range(0, stop, batch_size)]
    rng.shuffle(batches)
    return batches


def lockstep_batches(pools: Sequence[int | Pool], batch_size: int, world_size: int) -> list[list[tuple[int, int]]]:
    """Every sample exactly once, in a fixed order (bucket by bucket), in a number of batches that is a
    multiple of `world_size`: the largest batch is halved until it is, so every rank runs the same
    number of steps (FSDP collectives must not wait on a rank that has finished)."""
    batches = [[(b, i) for i in pool[s : s + batch_size]] for b, pool in enumerate(_pools(pools)) for s in range(0, len(pool), batch_size)]
    while batches and len(batches) % world_size:
        k = max(range(len(batches)), key=lambda j: len(batches[j]))
        big = batches[k]
        if len(big) < 2:
            raise DataError(f"{sum(map(len, batches))} validation/predict samples cannot be dealt evenly to {world_size} ranks "
                            "(fewer samples than ranks); hold out more (--data.val_samples_per_bucket) or use fewer ranks")
        batches[k : k + 1] = [big[: len(big) // 2], big[len(big) // 2 :]]
    return batches


def plan_digest(keys: list[str], pools: list[list[int]], batch_size: int, seed: int) -> str:
    """Identifies the sequence of epoch plans; a checkpoint from a different plan cannot resume mid-epoch."""
    h = hashlib.sha256(json.dumps([keys, [len(p) for p in pools], batch_size, seed]).encode())
    for p in pools:
        h.update(np.asarray(p, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


class BucketBatchSampler(Sampler):
    """Yields this rank's batches of the epoch plan as lists of (epoch, consumed, steps, bucket, index):
    `consumed` is the global number of batches of the epoch consumed once this batch is (all ranks),
    `steps` the number this rank has then consumed in the epoch (what Lightning counts)."""

    def __init__(self, pools: Sequence[int | Pool], batch_size: int, seed: int, rank: int, world_size: int, drop_last: bool = True):
        self.pools, self.batch_size, self.seed, self.drop_last = _pools(pools), batch_size, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.offset = 0  # global batches of `epoch` already consumed (possibly at another world size)
        self.steps = 0  # batches this rank consumed in `epoch` before `offset` (Lightning's restored count)
        self._handed_out_epoch = False
        self._plan: tuple[int, list] | None = None

    def resume(self, epoch: int, offset: int, steps: int) -> None:
        self.epoch, self.offset, self.steps, self._handed_out_epoch = epoch, offset, steps, False

    def epoch_plan(self, epoch: int) -> list[list[tuple[int, int]]]:
        if self._plan is None or self._plan[0] != epoch:
            self._plan = (epoch, batch_plan(self.pools, self.batch_size, self.seed, epoch, self.drop_last))
        return self._plan[1]

    def remaining(self, epoch: int, offset: int) -> int:
        """Global batches left in `epoch` after `offset`, cut to a multiple of the world size."""
        n = max(len(self.epoch_plan(epoch)) - offset, 0)
        return n - n % self.world_size if self.drop_last else n

    def rank_plan(self, epoch: int, offset: int = 0) -> list[list[tuple[int, int]]]:
        plan = self.epoch_plan(epoch)
        return plan[offset : offset + self.remaining(epoch, offset)][self.rank :: self.world_size]

    def __len__(self) -> int:
        # Lightning reads len() once per fit, counts an epoch's batches across a restart (the restored
        # steps + the rest) and ends an epoch early when that count reaches len(); so len() is at least
        # every epoch's real length here and the epoch ends on StopIteration, never cut short.
        return max(len(self.rank_plan(self.epoch, 0)), self.steps + len(self.rank_plan(self.epoch, self.offset)))

    def __iter__(self) -> Iterator[list[tuple[int, int, int, int, int]]]:
        # Lightning stops reading once it has len() batches, so the epoch cannot advance on exhaustion:
        # it advances when an iteration starts after the previous one handed out its last batch.
        if self._handed_out_epoch:
            self.resume(self.epoch + 1, 0, 0)
        epoch, offset, steps, world = self.epoch, self.offset, self.steps, self.world_size
        plan = self.rank_plan(epoch, offset)
        self._handed_out_epoch = not plan
        for p, batch in enumerate(plan):
            self._handed_out_epoch = p == len(plan) - 1
            yield [(epoch, offset + (p + 1) * world, steps + p + 1, b, i) for b, i in batch]


class FixedBatchSampler(Sampler):
    """This rank's share (round-robin) of a fixed list of batches: validation and predict."""

    def __init__(self, batches: list[list[tuple[int, int]]], rank: int, world_size: int):
        self.batches = batches[rank::world_size]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[tuple[int, int, int, int, int]]]:
        for batch in self.batches:
            yield [(VAL_EPOCH, 0, 0, b, i) for b, i in batch]


# ------------------------------------------------------------------------------------------- dataset
class BucketedLatents(Dataset):
    """Random access over several LitData bucket datasets; opened lazily in each worker.

    `pools[b]` lists the indices of bucket `b` this split may use; a corrupt record is replaced by the
    next readable one of its pool (deterministic) and the item carries `_corrupt` = (reason, where).
    `damage[b]` lists bucket `b`'s short chunks (data_modules.chunks): their intact records are read from
    the file directly, never through LitData's wait for the full chunk."""

    def __init__(self, bucket_dirs: list[str], pools: Sequence[int | Pool] | None = None, damage: list[list[ChunkDamage]] | None = None):
        self.bucket_dirs = bucket_dirs
        self.pools = _pools(pools) if pools is not None else None
        self.shapes = [latent_shape(d) for d in bucket_dirs]
        self.damage = damage if damage is not None else [[] for _ in bucket_dirs]
        self._datasets = None
        self._salvage: list[ChunkSalvage] | None = None

    def _open(self):
        if self._datasets is None:
            from litdata import StreamingDataset

            self._datasets = [StreamingDataset(d) for d in self.bucket_dirs]
        return self._datasets

    def __len__(self) -> int:
        return sum(len(d) for d in self._open())

    def _fetch(self, b: int, i: int) -> Any:
        if self._salvage is None:
            self._salvage = [ChunkSalvage(d, dmg) for d, dmg in zip(self.bucket_dirs, self.damage)]
        if self._salvage[b].covers(i):
            return self._salvage[b].read(i)  # None past the cut
        return self._open()[b][i]

    def _read(self, b: int, i: int) -> tuple[dict[str, Any] | None, str | None]:
        """(record, None), or (None, why it cannot be used)."""
        try:
            item = self._fetch(b, i)
        except Exception:  # noqa: BLE001 - an unreadable chunk or record is replaced and counted, not fatal
            return None, "unreadable"
        if item is None:
            return None, "truncated_chunk"
        if not isinstance(item, dict) or not isinstance(item.get("caption"), str) or not any(k in item for k in LATENT_KEYS):
            return None, "missing_fields"
        for key, value in item.items():
            if not isinstance(value, torch.Tensor):
                continue
            if key in LATENT_KEYS and self.shapes[b] is not None and tuple(value.shape) != self.shapes[b]:
                return None, f"wrong_shape:{key}"
            if key == "prompt_embeds" and value.ndim != 2:
                return None, f"wrong_shape:{key}"
            if key == TOKEN_KEY:  # caption tokens (prepare --text-storage tokens): ids, encoded online in training
                if value.ndim != 1 or value.is_floating_point() or (len(value) and int(value.min()) < 0):
                    return None, f"wrong_shape:{key}"
                continue
            # collate needs float32 anyway; one sum is far cheaper than an elementwise isfinite on fp16
            # on CPU, and any NaN/Inf makes it non-finite (fp16 values cannot overflow a float32 sum).
            item[key] = value = value.float()
            if not torch.isfinite(value.sum()):
                return None, f"non_finite:{key}"
        return item, None

    def _substitute(self, b: int, i: int) -> dict[str, Any]:
        pool = self.pools[b] if self.pools is not None else range(len(self._open()[b]))
        start = bisect.bisect_right(pool, i)
        for k in range(len(pool)):
            j = pool[(start + k) % len(pool)]
            if j != i and (item := self._read(b, j)[0]) is not None:
                return item
        raise DataError(f"{self.bucket_dirs[b]}: no readable record left in this bucket; re-run `lit-ovis prepare` for it")

    def __getitem__(self, key: tuple[int, int, int, int, int]) -> dict[str, Any]:
        epoch, consumed, steps, b, i = key
        item, reason = self._read(b, i)
        if item is None:
            item = self._substitute(b, i)
        item["_corrupt"] = (reason, f"{bucket_key(self.bucket_dirs[b])}#{i}") if reason else None
        if epoch != VAL_EPOCH:
            item["_progress"] = (epoch, consumed, steps)
        return item


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"corrupt": [x["_corrupt"] for x in items if x.get("_corrupt")]}
    if "_progress" in items[0]:
        out["_progress"] = items[0]["_progress"]
    for key in LATENT_KEYS:
        if key in items[0]:
            out[key] = torch.stack([x[key].float() for x in items])
    out["captions"] = [x["caption"] for x in items]
    out["prompts"] = out["captions"]
    out["ids"] = [x["id"] for x in items]
    out["languages"] = [x.get("language", "en") for x in items]
    out["target_texts"] = [x.get("target_text", "") for x in items]
    if all("prompt_embeds" in x for x in items):
        length = max(x["prompt_embeds"].shape[0] for x in items)
        dim = items[0]["prompt_embeds"].shape[1]
        embeds = torch.zeros(len(items), length, dim)
        for k, x in enumerate(items):
            embeds[k, : x["prompt_embeds"].shape[0]] = x["prompt_embeds"].float()
        out["prompt_embeds"] = embeds
    elif all(TOKEN_KEY in x for x in items):  # right-padded ids + lengths: OvisTextEncoder.encode_tokens re-pads them
        lengths = torch.tensor([len(x[TOKEN_KEY]) for x in items])
        tokens = torch.zeros(len(items), int(lengths.max()), dtype=torch.long)
        for k, x in enumerate(items):
            tokens[k, : len(x[TOKEN_KEY])] = x[TOKEN_KEY].long()
        out[TOKEN_KEY], out["prompt_token_lengths"] = tokens, lengths
    return out


# ------------------------------------------------------------------------------------------- module
class LatentDataModule(L.LightningDataModule):
    """Prepared latents (optionally with text embeddings), batched per bucket, resumable mid-epoch at any
    world size, with an optional validation split.

    `synthetic_samples > 0` builds a synthetic text-rendering dataset in `root` on first use (the demo).

    Args:
        root: prepared dataset root (`lit-ovis prepare --output-dir`), local or a URL LitData streams from.
        batch_size: samples per batch and rank; every batch holds one aspect-ratio bucket.
        num_workers: DataLoader worker processes per rank.
        seed: seed of the batch plan (shuffle, validation hold-out).
        resolutions: prepared resolutions to train on (default: all in root).
        synthetic_samples: > 0 builds that many synthetic text-rendering samples in root on first use, encoded
            with the model's encoders (model.encoders).
        synthetic_resolution: resolution of that synthetic set (a multiple of 16).
        val_samples_per_bucket: samples per bucket held out of training for validation.
        val_root: a separately prepared validation dataset (instead of a hold-out).
        val_batch_size: validation batch size (default: batch_size).
        build_timeout_s: how long the other ranks wait for rank 0 to build the synthetic set before they
            fail with one line (build big sets beforehand with `lit-ovis prepare`).
        worker_timeout_s: a DataLoader worker that produces no batch for this long fails the run with one
            line (unreachable storage, a stuck read); 0 waits forever.
    """

    def __init__(
        self,
        root: str = "data/demo",
        batch_size: int = 8,
        num_workers: int = 2,
        seed: int = 0,
        resolutions: list[int] | None = None,
        synthetic_samples: int = 0,
        synthetic_resolution: int = 64,
        val_samples_per_bucket: int = 0,
        val_root: str | None = None,
        val_batch_size: int | None = None,
        build_timeout_s: float = 3600.0,
        worker_timeout_s: float = 600.0,
    ):
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"--data.batch_size must be >= 1 (got {batch_size})")
        if val_samples_per_bucket < 0:
            raise ConfigError(f"--data.val_samples_per_bucket must be >= 0 (got {val_samples_per_bucket})")
        if val_samples_per_bucket and val_root:
            raise ConfigError("set one of --data.val_samples_per_bucket (held out of root) and --data.val_root (a separate dataset), not both")
        self.root, self.batch_size, self.num_workers, self.seed = root, batch_size, num_workers, seed
        self.resolutions = resolutions
        self.synthetic = dict(samples=synthetic_samples, resolution=synthetic_resolution)
        self.val_samples_per_bucket, self.val_root = val_samples_per_bucket, val_root
        self.val_batch_size = val_batch_size or batch_size
        self.build_timeout_s, self.worker_timeout_s = build_timeout_s, worker_timeout_s
        self.sampler: BucketBatchSampler | None = None
        self.plan_id = ""
        self.val_dataset: BucketedLatents | None = None
        self.val_plan: list[list[tuple[int, int]]] = []
        self._resume: dict | None = None
        self.consumed = {"epoch": 0, "consumed": 0, "steps": 0}
        self.corrupt_skipped = 0
        self.corrupt_by_reason: Counter = Counter()
        self.damaged_records = 0  # records lost to damaged chunks, found in setup (not in the plan)

    def synthetic_builder(self) -> Callable[[], Any] | None:
        """What builds this module's synthetic dataset, or None when it reads prepared data only."""
        if self.synthetic["samples"] > 0:
            enc = self.encoders()  # the model's (model.encoders), read now: the builder may run later
            return lambda: ensure_synthetic_dataset(self.root, self.synthetic["samples"], self.synthetic["resolution"], **enc)
        return None

    def encoders(self) -> dict[str, Any]:
        """The model's text encoder, VAE and sequence length (`model.encoders`, set once) for data this module
        builds itself; the tiny ones without a model (a data module used on its own)."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        cfg = getattr(module, "encoders_cfg", None)
        if cfg is None:
            from lit_ovis.modules.config import EncoderConfig

            cfg = EncoderConfig()
        return {"text_encoder": cfg.text_encoder, "vae": cfg.vae, "max_sequence_length": cfg.max_sequence_length,
                "template_cut": cfg.template_cut}

    def build_data(self) -> None:
        """Build the synthetic dataset, on rank 0 alone (see `build_on_rank0`); a no-op once it is there.
        Not Lightning's `prepare_data`: Lightning makes the other ranks wait for that without a timeout."""
        build = self.synthetic_builder()
        if build is not None:
            build_on_rank0(build, f"build the synthetic dataset in {self.root}", self.build_timeout_s)

    def _resolutions(self) -> list[int] | None:
        # A synthetic root serves the resolution it is built at, not leftovers of another demo setting.
        return self.resolutions or ([self.synthetic["resolution"]] if self.synthetic["samples"] > 0 else None)

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            # Our samplers shard by rank themselves; Lightning must not wrap them in a DistributedSampler.
            trainer._accelerator_connector.use_distributed_sampler = False
            return trainer.global_rank, trainer.world_size
        return 0, 1

    def _scan_damage(self, dirs: list[str], rank: int) -> list[list[ChunkDamage]]:
        """Each bucket's damaged chunks, reported once (rank 0) and counted in `damaged_records`."""
        damage = [scan_chunks(d) for d in dirs]
        self.damaged_records = sum(c.lost for dmg in damage for c in dmg)
        if rank == 0:
            for d, dmg in zip(dirs, damage):
                for chunk in dmg:
                    log.warning("data: %s", chunk.describe(d))
        return damage

    def _readable(self, dirs: list[str], rank: int) -> list[str]:
        """The buckets whose index can be read; the others are left out, reported once (rank 0)."""
        problems = {d: index_problem(d) for d in dirs}
        for d, problem in problems.items():
            if problem and rank == 0:
                log.warning("data: %s; this bucket is left out; re-run `lit-ovis prepare` to rebuild it", problem)
        usable = [d for d in dirs if not problems[d]]
        if not usable:
            raise DataError(f"{self.root}: no bucket has a readable index.json; re-run `lit-ovis prepare`")
        return usable

    def _check_template_cut(self, dirs: list[str]) -> None:
        """Stored text (embeddings or tokens) cut as the model cuts it: a mismatch would shift every caption."""
        module = getattr(self.trainer, "lightning_module", None)
        if getattr(module, "encoders_cfg", None) is None:  # a data module read on its own: no model to agree with
            return
        want = module.encoders_cfg.template_cut
        for d in {os.path.dirname(d.rstrip("/")): d for d in dirs}.values():  # one report per resolution
            config = (resolution_report(d) or {}).get("config", {})
            if config.get("text_encoder") and (config.get("text_storage") or "embeddings") != "captions":
                have = config.get("template_cut", "pipeline")
                if have != want:
                    raise DataError(f"{d}: text prepared with template_cut={have} but the model uses {want}; re-run "
                                    f"lit-ovis prepare with --template-cut {want} or set --model.encoders.template_cut={have}")

    def setup(self, stage: str) -> None:
        rank, world = self._rank_world()
        self.build_data()
        dirs = self._readable(discover_buckets(self.root, self._resolutions()), rank)
        self._check_template_cut(dirs)
        sizes = bucket_sizes(dirs)
        keys = [bucket_key(d) for d in dirs]
        damage = self._scan_damage(dirs, rank)
        train_pools, val_pools = holdout(keys, sizes, self.val_samples_per_bucket, self.seed)
        # Records past the cut of a damaged chunk never enter a plan (no per-read wait, no substitutes).
        lost = [{i for c in dmg for i in range(c.first + c.intact, c.first + c.count)} for dmg in damage]
        train_pools = [[i for i in pool if i not in gone] for pool, gone in zip(train_pools, lost)]
        val_pools = [[i for i in pool if i not in gone] for pool, gone in zip(val_pools, lost)]
        self.dataset = BucketedLatents(dirs, train_pools, damage)
        self.sampler = BucketBatchSampler(train_pools, self.batch_size, self.seed, rank, world)
        self.plan_id = plan_digest(keys, train_pools, self.batch_size, self.seed)
        if stage == "fit" and self.sampler.remaining(0, 0) == 0:
            note = f" ({self.damaged_records} records of damaged chunks left out)" if self.damaged_records else ""
            raise DataError(f"{self.root}: fewer training samples per bucket{note} than --data.batch_size={self.batch_size} x {world} ranks; "
                            "lower the batch size or prepare more data")
        if self.val_root:
            vdirs = self._readable(discover_buckets(self.val_root, self._resolutions()), rank)
            vdamage = [scan_chunks(d) for d in vdirs]
            vpools = [[i for i in range(n) if not any(c.first + c.intact <= i < c.first + c.count for c in dmg)]
                      for n, dmg in zip(bucket_sizes(vdirs), vdamage)]
            self.val_dataset = BucketedLatents(vdirs, vpools, vdamage)
        elif self.val_samples_per_bucket:
            self.val_dataset = BucketedLatents(dirs, val_pools, damage)
        if self.val_dataset is not None:
            self.val_plan = lockstep_batches(self.val_dataset.pools, self.val_batch_size, world)
        self._apply_resume(self._resume if self._resume is not None else self.consumed)

    def _apply_resume(self, state: dict[str, Any]) -> None:
        """Point the sampler at the first global batch not consumed according to `state` (any world size).

        An epoch that is over stays current with nothing left (its iteration ends at once and moves on),
        so the sampler's epochs stay aligned with Lightning's restored batch count."""
        self._resume = None
        world = self.sampler.world_size
        epoch = int(state.get("epoch", 0))
        if "consumed" in state:
            consumed = int(state["consumed"])
            steps = int(state.get("steps", consumed // int(state.get("world_size", world))))
        else:  # format 1 stored this rank's position; ranks were in lockstep at the same world size
            steps = int(state.get("next_pos", 0))
            consumed = steps * int(state.get("world_size", world))
        same_plan = (state.get("plan", self.plan_id) == self.plan_id and state.get("batch_size", self.batch_size) == self.batch_size
                     and state.get("seed", self.seed) == self.seed)
        if not same_plan:
            rank_zero_warn(f"{self.root}: the data, batch size, seed or validation split changed since the checkpoint; "
                           f"the interrupted epoch {epoch} cannot be continued exactly, continuing with epoch {epoch + 1}")
            consumed = len(self.sampler.epoch_plan(epoch))  # nothing of the old plan's epoch is left
        self.sampler.resume(epoch, consumed, steps)
        self.consumed = {"epoch": epoch, "consumed": consumed, "steps": steps}

    def _worker_timeout(self) -> float:
        # DataLoader's own timeout: a worker that produces nothing raises instead of hanging the run.
        return float(self.worker_timeout_s) if self.num_workers > 0 and self.worker_timeout_s else 0.0

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset, batch_sampler=self.sampler, num_workers=self.num_workers, collate_fn=collate,
            persistent_workers=False, pin_memory=torch.cuda.is_available(), timeout=self._worker_timeout(),
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None:
            return []  # no validation set configured: Lightning skips validation
        rank, world = self._rank_world()
        sampler = FixedBatchSampler(self.val_plan, rank, world)
        return DataLoader(self.val_dataset, batch_sampler=sampler, num_workers=self.num_workers, collate_fn=collate,
                          persistent_workers=False, pin_memory=torch.cuda.is_available(), timeout=self._worker_timeout())

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        if "_progress" in batch:
            epoch, consumed, steps = (int(v) for v in batch.pop("_progress"))
            self.consumed = {"epoch": epoch, "consumed": consumed, "steps": steps}
        for reason, where in batch.pop("corrupt", None) or []:
            self.corrupt_skipped += 1
            self.corrupt_by_reason[reason] += 1
            if self.corrupt_by_reason[reason] == 1:  # the first of each kind; the rest are summarised at the end
                log.warning("data: record %s is corrupt (%s); replaced by the next readable record of its bucket, "
                            "further ones are counted", where, reason)
        return batch

    def teardown(self, stage: str) -> None:
        if self.corrupt_skipped or self.damaged_records:
            rank = self._rank_world()[0]
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.corrupt_by_reason.items())) or "none"
            log.warning("data (rank %d): %d corrupt records replaced so far (%s); %d records of damaged chunks left out",
                        rank, self.corrupt_skipped, reasons, self.damaged_records)

    def state_dict(self) -> dict[str, Any]:
        world = self.sampler.world_size if self.sampler is not None else 1
        return {**self.consumed, "world_size": world, "plan": self.plan_id, "seed": self.seed, "batch_size": self.batch_size,
                "corrupt_skipped": self.corrupt_skipped, "corrupt_by_reason": dict(self.corrupt_by_reason)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.corrupt_skipped = int(state.get("corrupt_skipped", 0))
        self.corrupt_by_reason = Counter(state.get("corrupt_by_reason", {}))
        self._resume = dict(state)
        if self.sampler is not None:  # Lightning restores after setup(); tests may load before it
            self._apply_resume(self._resume)


def ensure_synthetic_dataset(
    root: str, samples: int = 64, resolution: int = 64, text_encoder: str | None = "tiny", vae: str = "tiny",
    max_sequence_length: int = 256, seed: int = 0, template_cut: str = "pipeline",
) -> dict:
    """Prepare a synthetic text-rendering dataset at `resolution` in `root`; a no-op when one with the same
    inputs and settings is already there (prepare's fingerprint), incremental when only `samples` grew."""
    from data_modules.prepare import PrepareConfig, prepare, synthetic_records
    from data_modules.ranks import ShardSpec

    cfg = PrepareConfig(
        output_dir=root, resolution=resolution, min_side=min(64, resolution), text_encoder=text_encoder, vae=vae,
        max_sequence_length=max_sequence_length, template_cut=template_cut, seed=seed, num_workers=min(2, os.cpu_count() or 1),
        shard_size=64,
    )
    # One process builds the whole set (the training's rank 0, while the others wait): never a shard of a group
    # inferred from the launcher's environment, which under srun/torchrun would wait for ranks that are not preparing.
    return prepare(synthetic_records(samples), cfg, shard=ShardSpec())
