"""The one writer of bucketed LitData datasets, shared by `prepare`, `make-pairs` and the synthetic preference
pairs: items go to one LitData dataset per aspect-ratio bucket of one resolution, built in a hidden temp
directory and swapped in with its report, then the root report is rebuilt (layout: data_modules/layout.py).

    writer = BucketedWriter(root, resolution)
    writer.add("256x256", {"id": ..., "latents": ...})      # streamed: one open chunk buffer per bucket
    writer.finish({"inputs": ..., ...})                       # report += buckets; readers see old or new data

A sharded prepare writes one dataset from several ranks: each rank's `BucketedWriter(..., rank=r, world=W)` writes
its own chunks and per-rank index into the shared temp directory (`close`), then rank 0 joins the indexes with
LitData's merge and publishes (`publish`).

Text embeddings are stored trimmed (`trim_embeddings`): the padding rows of an encoded prompt are exactly zero,
so only the valid prefix goes to disk and collate zero-pads it back to the encoder length.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from data_modules.buckets import bucket_name
from data_modules.layout import BUCKET_DIR, LATENT_KEYS, REPORT, bucket_writer, merge_rank_indexes, swap_in, temp_dir, update_root_report
from lit_ovis.files import atomic_write_json

DEFAULT_CHUNK_BYTES = 64 << 20


def trim_embeddings(embeds: torch.Tensor) -> torch.Tensor:
    """[L, D] prompt embeddings -> their valid prefix [n, D] (up to the last row that is not all zero)."""
    nonzero = (embeds.abs().sum(-1) > 0).nonzero()
    return embeds[: int(nonzero.max()) + 1 if len(nonzero) else 0]


def chunk_bytes_for(budget_mb: int, n_buckets: int) -> int:
    """LitData chunk size when all bucket writers are open at once: their buffers share a RAM budget."""
    mb = 1 << 20
    return int(min(64 * mb, max(4 * mb, budget_mb * mb // max(n_buckets, 1))))


def latent_geometry_of(bucket: str, item: dict[str, Any]) -> dict[str, int]:
    """`latent_channels` and `latent_scale` (pixels per latent cell) of an item's latents in a `<W>x<H>` bucket:
    what the data module checks every latent's shape against (FLUX's VAE: 16 and 8, the CPU-scale one: 16 and 4)."""
    latents = next((item[k] for k in LATENT_KEYS if k in item), None)
    match = BUCKET_DIR.match(bucket)
    if latents is None or match is None:
        return {}
    return {"latent_channels": int(latents.shape[0]), "latent_scale": int(match.group(1)) // int(latents.shape[-1])}


class BucketedWriter:
    """One resolution of a bucketed root, written item by item and published atomically by `finish`.

    With `world` > 1 this is rank `rank`'s part: the temp directory is made `fresh` once (an interrupted earlier write
    removed) before every rank opens its writer with `fresh=False`; each `close`s its part, then rank 0 alone `publish`es."""

    def __init__(self, root: str | Path, resolution: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES, rank: int = 0, world: int = 1,
                 fresh: bool = True):
        self.root, self.resolution, self.chunk_bytes = Path(root), int(resolution), chunk_bytes
        self.rank, self.world = rank, world
        self.tmp = temp_dir(self.root, self.resolution)
        if fresh:
            shutil.rmtree(self.tmp, ignore_errors=True)  # an interrupted earlier write
            self.tmp.mkdir(parents=True)
        else:
            self.tmp.mkdir(parents=True, exist_ok=True)
        self.writers: dict[str, Any] = {}
        self.sizes: Counter = Counter()
        self.geometry: dict[str, int] = {}  # latent channels and VAE factor, read off the first item

    def add(self, bucket: tuple[int, int] | str, item: dict[str, Any]) -> None:
        name = bucket if isinstance(bucket, str) else bucket_name(bucket)
        if not self.geometry:
            self.geometry = latent_geometry_of(name, item)
        if name not in self.writers:
            self.writers[name] = bucket_writer(self.tmp / name, self.chunk_bytes, self.rank, self.world)
        self.writers[name][self.sizes[name]] = item
        self.sizes[name] += 1

    @property
    def buckets(self) -> dict[str, int]:
        return dict(sorted(self.sizes.items()))

    def close(self) -> dict[str, int]:
        """Write this rank's last chunks and its index; returns its items per bucket."""
        for writer in self.writers.values():
            writer.done()
        if self.world == 1:
            for writer in self.writers.values():
                writer.merge()
        return self.buckets

    def publish(self, report: dict[str, Any], buckets: dict[str, int] | None = None,
                geometry: dict[str, int] | None = None) -> dict[str, Any]:
        """Rank 0, once every rank has closed: join the ranks' indexes (`buckets`: every rank's items per bucket,
        summed), write `report` (with `resolution`, the latent geometry and `buckets` added) inside the dataset,
        swap it in at `<root>/<resolution>/` and rebuild `<root>/report.json`. `geometry`: the latent channels and
        scale any rank read off its items (rank 0 may have written none); this writer's own when not given."""
        buckets = self.buckets if buckets is None else dict(sorted(buckets.items()))
        if self.world > 1:
            for name in buckets:
                merge_rank_indexes(self.tmp / name, self.world)
        geometry = self.geometry if geometry is None else geometry
        report = {"resolution": self.resolution, **report, **geometry, "buckets": buckets}
        atomic_write_json(self.tmp / REPORT, report)  # the report travels inside the swap with its data
        swap_in(self.tmp, self.root / str(self.resolution))
        update_root_report(self.root)
        return report

    def finish(self, report: dict[str, Any]) -> dict[str, Any]:
        """`close` and `publish` for a writer that is the only one (a world of one)."""
        self.close()
        return self.publish(report)
