"""Streaming DataModule over prepared, aspect-ratio-bucketed LitData datasets.

Batching: each epoch has a deterministic *batch plan* drawn from (seed, epoch): every bucket's samples
are shuffled and cut into batches of one bucket each (so every batch has one latent shape), and all
batches are shuffled together, so buckets are drawn in proportion to their size. The plan is cut to a
multiple of the world size and dealt round-robin to ranks; DataLoader workers fetch the batches of
their rank. Each batch carries its (epoch, position) in the rank's plan; the DataModule records the
position of the last batch the model consumed and saves it in the Lightning checkpoint, so a resumed
run continues mid-epoch with exactly the remaining batches (no sample repeated or skipped).

Inputs may be local paths or any URL LitData streams from (s3://, gs://, ...).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lit_ovis.errors import ConfigError, DataError

REMOTE = ("s3://", "gs://", "gcs://", "az://", "abfs://", "hf://", "http://", "https://")


def discover_buckets(root: str, resolutions: list[int] | None = None) -> list[str]:
    """Bucket dataset directories under `root` (`<root>/<resolution>/<WxH>/index.json`), sorted."""
    if root.startswith(REMOTE):
        report = _read_remote_report(root)
        names = [f"{report['resolution']}/{b}" for b in report["buckets"]]
        return [f"{root.rstrip('/')}/{n}" for n in names if resolutions is None or int(n.split("/")[0]) in resolutions]
    base = Path(root)
    if not base.exists():
        raise DataError(f"{root}: dataset not found; run `lit-ovis prepare --output-dir {root} ...` first")
    dirs = sorted(p.parent for p in base.glob("*/*/index.json"))
    if resolutions is not None:
        dirs = [d for d in dirs if d.parent.name.isdigit() and int(d.parent.name) in resolutions]
    if not dirs:
        raise DataError(f"{root}: no prepared buckets (expected <root>/<resolution>/<WxH>/index.json); run `lit-ovis prepare`")
    return [str(d) for d in dirs]


def _read_remote_report(root: str) -> dict:
    from litdata.streaming.resolver import _resolve_dir  # noqa: F401  (validates the URL scheme)
    import fsspec

    with fsspec.open(f"{root.rstrip('/')}/report.json", "r") as f:
        return json.load(f)


def bucket_sizes(bucket_dirs: list[str]) -> list[int]:
    from litdata import StreamingDataset

    return [len(StreamingDataset(d)) for d in bucket_dirs]


def batch_plan(sizes: list[int], batch_size: int, seed: int, epoch: int, world_size: int = 1, drop_last: bool = True) -> list[list[tuple[int, int]]]:
    """All batches of one epoch as lists of (bucket, index); identical on every rank."""
    rng = random.Random(f"{seed}-{epoch}")
    batches = []
    for b, n in enumerate(sizes):
        order = list(range(n))
        rng.shuffle(order)
        stop = n - n % batch_size if drop_last else n
        batches += [[(b, i) for i in order[s : s + batch_size]] for s in range(0, stop, batch_size)]
    rng.shuffle(batches)
    if not drop_last:  # inference: every sample once, ranks may get one batch more than others
        return batches
    return batches[: len(batches) - len(batches) % world_size]


class BucketBatchSampler(Sampler):
    """Yields this rank's batches of the epoch plan as lists of (epoch, position, bucket, index)."""

    def __init__(self, sizes: list[int], batch_size: int, seed: int, rank: int, world_size: int, drop_last: bool = True):
        self.sizes, self.batch_size, self.seed, self.drop_last = sizes, batch_size, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.start = 0  # position in this rank's plan to resume from

    def rank_plan(self, epoch: int) -> list[list[tuple[int, int]]]:
        return batch_plan(self.sizes, self.batch_size, self.seed, epoch, self.world_size, self.drop_last)[self.rank :: self.world_size]

    def __len__(self) -> int:
        return len(self.rank_plan(self.epoch))

    def __iter__(self) -> Iterator[list[tuple[int, int, int, int]]]:
        plan = self.rank_plan(self.epoch)
        epoch, start = self.epoch, self.start
        for pos in range(start, len(plan)):
            yield [(epoch, pos, b, i) for b, i in plan[pos]]
        self.epoch, self.start = epoch + 1, 0


class BucketedLatents(Dataset):
    """Random access over several LitData bucket datasets; opened lazily in each worker."""

    def __init__(self, bucket_dirs: list[str], max_corrupt: int = 1000):
        self.bucket_dirs = bucket_dirs
        self._datasets = None
        self.max_corrupt = max_corrupt

    def _open(self):
        if self._datasets is None:
            from litdata import StreamingDataset

            self._datasets = [StreamingDataset(d) for d in self.bucket_dirs]
        return self._datasets

    def __len__(self) -> int:
        return sum(len(d) for d in self._open())

    def __getitem__(self, key: tuple[int, int, int, int]) -> dict[str, Any] | None:
        epoch, pos, b, i = key
        try:
            item = self._open()[b][i]
        except Exception:  # noqa: BLE001 - a corrupt chunk or record is skipped and counted, not fatal
            return {"_corrupt": True, "_epoch": epoch, "_pos": pos}
        item["_epoch"], item["_pos"] = epoch, pos
        return item


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    good = [x for x in items if not x.get("_corrupt")]
    out: dict[str, Any] = {"_epoch": items[0]["_epoch"], "_pos": items[0]["_pos"], "corrupt": len(items) - len(good)}
    if not good:
        return out
    for key in ("latents", "latents_w", "latents_l"):
        if key in good[0]:
            out[key] = torch.stack([x[key].float() for x in good])
    out["captions"] = [x["caption"] for x in good]
    out["prompts"] = out["captions"]
    out["ids"] = [x["id"] for x in good]
    out["languages"] = [x.get("language", "en") for x in good]
    out["target_texts"] = [x.get("target_text", "") for x in good]
    if all("prompt_embeds" in x for x in good):
        length = max(x["prompt_embeds"].shape[0] for x in good)
        dim = good[0]["prompt_embeds"].shape[1]
        embeds = torch.zeros(len(good), length, dim)
        for k, x in enumerate(good):
            embeds[k, : x["prompt_embeds"].shape[0]] = x["prompt_embeds"].float()
        out["prompt_embeds"] = embeds
    return out


class LatentDataModule(L.LightningDataModule):
    """Prepared latents (optionally with text embeddings), batched per bucket, resumable mid-epoch.

    `synthetic_samples > 0` builds a synthetic text-rendering dataset in `root` on first use (the demo).
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
        text_encoder: str | None = "tiny",
        vae: str = "tiny",
        max_sequence_length: int = 256,
    ):
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"--data.batch_size must be >= 1 (got {batch_size})")
        self.root, self.batch_size, self.num_workers, self.seed = root, batch_size, num_workers, seed
        self.resolutions = resolutions
        self.synthetic = dict(samples=synthetic_samples, resolution=synthetic_resolution, text_encoder=text_encoder, vae=vae, max_sequence_length=max_sequence_length)
        self.sampler: BucketBatchSampler | None = None
        self._resume: dict | None = None
        self.consumed = {"epoch": 0, "next_pos": 0}
        self.corrupt_skipped = 0

    def prepare_data(self) -> None:
        if self.synthetic["samples"] > 0:
            ensure_synthetic_dataset(self.root, **self.synthetic)

    def setup(self, stage: str) -> None:
        dirs = discover_buckets(self.root, self.resolutions)
        sizes = bucket_sizes(dirs)
        trainer = self.trainer
        rank = trainer.global_rank if trainer else 0
        world = trainer.world_size if trainer else 1
        if trainer is not None:
            # Our sampler shards by rank itself; Lightning must not wrap it in a DistributedSampler.
            trainer._accelerator_connector.use_distributed_sampler = False
        self.dataset = BucketedLatents(dirs)
        self.sampler = BucketBatchSampler(sizes, self.batch_size, self.seed, rank, world)
        if not len(self.sampler):
            raise DataError(f"{self.root}: fewer samples per bucket than --data.batch_size={self.batch_size} x {world} ranks; lower the batch size or prepare more data")
        if self._resume is not None:
            self._apply_resume()

    def _apply_resume(self) -> None:
        epoch, pos = self._resume["epoch"], self._resume["next_pos"]
        if pos >= len(self.sampler.rank_plan(epoch)):
            epoch, pos = epoch + 1, 0
        self.sampler.epoch, self.sampler.start = epoch, pos
        self.consumed = {"epoch": epoch, "next_pos": pos}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset, batch_sampler=self.sampler, num_workers=self.num_workers, collate_fn=collate,
            persistent_workers=False, pin_memory=torch.cuda.is_available(),
        )

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        if "_epoch" in batch:
            self.consumed = {"epoch": int(batch.pop("_epoch")), "next_pos": int(batch.pop("_pos")) + 1}
            self.corrupt_skipped += int(batch.pop("corrupt", 0))
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {**self.consumed, "seed": self.seed, "batch_size": self.batch_size, "corrupt_skipped": self.corrupt_skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("batch_size", self.batch_size) != self.batch_size or state.get("seed", self.seed) != self.seed:
            # A different plan would silently repeat/skip samples; start the epoch afresh instead.
            state = {"epoch": state.get("epoch", 0) + 1, "next_pos": 0}
        self._resume = {"epoch": int(state["epoch"]), "next_pos": int(state["next_pos"])}
        self.corrupt_skipped = int(state.get("corrupt_skipped", 0))
        if self.sampler is not None:
            self._apply_resume()


def ensure_synthetic_dataset(
    root: str, samples: int = 64, resolution: int = 64, text_encoder: str | None = "tiny", vae: str = "tiny",
    max_sequence_length: int = 256, seed: int = 0,
) -> dict:
    """Build a prepared synthetic text-rendering dataset in `root` unless a complete one is there."""
    report_path = Path(root) / "report.json"
    if report_path.exists():
        report = json.loads(report_path.read_text(encoding="utf-8"))
        if report.get("inputs") == samples and report.get("resolution") == resolution:
            return report
    from data_modules.prepare import PrepareConfig, prepare, synthetic_records

    cfg = PrepareConfig(
        output_dir=root, resolution=resolution, min_side=min(64, resolution), text_encoder=text_encoder, vae=vae,
        max_sequence_length=max_sequence_length, seed=seed, num_workers=min(2, os.cpu_count() or 1), shard_size=64,
    )
    return prepare(synthetic_records(samples), cfg)
