"""On-disk layout of a prepared root, shared by the bucketed writer (`data_modules.writer`) and discovery.

    <root>/<resolution>/<W>x<H>/        one LitData dataset per aspect-ratio bucket
    <root>/<resolution>/report.json     that resolution's report (written inside the dataset swap)
    <root>/report.json                  every resolution and its buckets (what remote discovery reads)
    <root>/_work/<resolution>/          restart cache of prepare / make-pairs (one file per finished shard)

Several resolutions live side by side in one root; each is replaced atomically (build in a hidden temp
directory, then rename), and hidden or non-numeric directories are never datasets.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from lit_ovis.files import atomic_write_json

REPORT = "report.json"
LATENT_KEYS = ("latents", "latents_w", "latents_l")  # what a record's latents are stored under (prepare / pairs)
# Latent geometry a resolution's report records (absent in older datasets: FLUX's 16 channels at 8x).
GEOMETRY_KEYS = ("latent_channels", "latent_scale")
DEFAULT_GEOMETRY = (16, 8)
WORK = "_work"
DEFAULT_MERGE_CHUNK_BYTES = 1 << 20  # unused by a merge; LitData needs a value
FORMAT = 2  # 1: a single top-level report.json with one `resolution` (older prepare / make-pairs outputs)
BUCKET_DIR = re.compile(r"^(\d+)x(\d+)$")


def bucket_writer(path: Path | str, chunk_bytes: int | str, rank: int = 0, world: int = 1):
    """A LitData writer for one bucket dataset, written by rank `rank` of `world` writers.

    LitData's writer takes its world size from torch.distributed: in a multi-process run where one rank
    builds the data (the synthetic demo set), its merge() would wait forever for index files from ranks
    that write nothing. The writer is told its world explicitly: one by default; in a sharded prepare each
    rank writes `chunk-<rank>-<n>.bin` and `<rank>.index.json`, which LitData's merge joins (`merge_rank_indexes`)."""
    from litdata.streaming.writer import BinaryWriter
    from litdata.utilities.env import _DistributedEnv

    writer = BinaryWriter(str(path), chunk_bytes=chunk_bytes)
    writer._distributed_env = _DistributedEnv(world_size=world, global_rank=rank, num_nodes=1)
    return writer


def merge_rank_indexes(path: Path | str, world: int) -> None:
    """Join the `<rank>.index.json` files the ranks of a sharded write left in one bucket into its `index.json`,
    with LitData's own merge (the one its multi-node `optimize` uses; ranks that wrote nothing have no file, so
    the merge that waits for all `world` of them cannot be used)."""
    bucket_writer(path, DEFAULT_MERGE_CHUNK_BYTES, 0, world)._merge_no_wait()


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def temp_dir(root: Path, resolution: int) -> Path:
    return root / f".{resolution}.tmp"


def work_dir(root: Path, resolution: int) -> Path:
    """The restart cache of one resolution's build (`prepare`'s shards, `make-pairs`' scored pairs)."""
    return Path(root) / WORK / str(resolution)


def swap_in(tmp: Path, final: Path) -> None:
    """Replace `final` by `tmp`; a kill at any point leaves either the old or the new dataset in place."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def resolution_dirs(root: Path) -> list[Path]:
    return sorted((d for d in root.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name)) if root.is_dir() else []


def update_root_report(root: Path) -> dict:
    """Rebuild `<root>/report.json` from the per-resolution reports on disk (no read-modify-write race
    between two prepare runs for different resolutions)."""
    resolutions = {}
    for d in resolution_dirs(root):
        rep = read_json(d / REPORT)
        if rep is None:
            continue
        keep = ("inputs", "kept", "buckets", "has_prompt_embeds", "fingerprint", "kind", *GEOMETRY_KEYS)
        resolutions[d.name] = {k: rep[k] for k in keep if k in rep}
    report = {
        "format": FORMAT,
        "resolutions": resolutions,
        "buckets": {f"{res}/{name}": n for res, rep in resolutions.items() for name, n in rep["buckets"].items()},
        "kept": sum(rep.get("kept", 0) for rep in resolutions.values()),
        "has_prompt_embeds": bool(resolutions) and all(rep.get("has_prompt_embeds", False) for rep in resolutions.values()),
    }
    atomic_write_json(root / REPORT, report)
    return report


def latent_geometry(report: dict | None) -> tuple[int, int]:
    """(latent channels, pixels per latent cell) of a resolution's report; FLUX's (16, 8) when it does not say."""
    if not report or any(k not in report for k in GEOMETRY_KEYS):
        return DEFAULT_GEOMETRY
    return int(report["latent_channels"]), int(report["latent_scale"])


def report_buckets(report: dict) -> dict[int, list[str]]:
    """{resolution: [bucket names]} from a root report of either format."""
    if "resolutions" in report:
        return {int(res): sorted(rep["buckets"]) for res, rep in report["resolutions"].items()}
    if "resolution" in report and "buckets" in report:
        return {int(report["resolution"]): sorted(report["buckets"])}
    return {}
