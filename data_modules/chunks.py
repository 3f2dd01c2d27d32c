"""Damaged LitData chunks found up front, and the intact records of a short chunk read directly.

LitData's reader waits, on every read, for a chunk file to reach the size its `index.json` records (2 s
for a local file, minutes for a remote one), then fails every record of that chunk, also the intact ones
before the cut. Comparing each chunk file's size with the index once per bucket (one directory listing)
finds short or missing chunks before training starts. A short chunk keeps its header (record count and
byte offsets, at the start of the file), so the records whose bytes lie wholly before the cut are read
here from the file with LitData's own deserialiser; only the records past the cut are lost.

Chunk layout (litdata.streaming.writer, uncompressed): uint32 n | uint32 offsets[n + 1] | record bytes,
where record k spans [offsets[k], offsets[k + 1]) of the file.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

INDEX = "index.json"


@dataclass(frozen=True)
class ChunkDamage:
    """A chunk file shorter than its index says (or missing): records [first, first + count) of its bucket."""

    filename: str
    first: int
    count: int
    expected_bytes: int
    actual_bytes: int  # -1: the file is missing
    intact: int  # leading records wholly inside the file (readable here)
    offsets: tuple[int, ...] = ()

    @property
    def lost(self) -> int:
        return self.count - self.intact

    def describe(self, bucket_dir: str) -> str:
        size = "missing" if self.actual_bytes < 0 else f"{self.actual_bytes} of {self.expected_bytes} bytes (truncated)"
        return (f"{bucket_dir.rstrip('/')}/{self.filename}: {size}; {self.lost} of its {self.count} records are skipped, "
                f"{self.intact} intact ones are read; re-run `lit-ovis prepare` to rebuild it")


def _fs(bucket_dir: str):
    import fsspec

    return fsspec.core.url_to_fs(bucket_dir)


def _index(fs, path: str) -> dict:
    with fs.open(f"{path.rstrip('/')}/{INDEX}", "rb") as f:
        return json.loads(f.read())


def index_problem(bucket_dir: str) -> str | None:
    """Why a bucket's index.json cannot be used (None when it can): the whole bucket is then left out."""
    try:
        fs, path = _fs(bucket_dir)
        index = _index(fs, path)
    except (OSError, ValueError) as err:
        return f"{bucket_dir.rstrip('/')}/{INDEX} is unreadable ({type(err).__name__}: truncated or corrupt)"
    if not isinstance(index, dict) or not isinstance(index.get("chunks"), list) or not isinstance(index.get("config"), dict):
        return f"{bucket_dir.rstrip('/')}/{INDEX} is not a LitData index (no chunks or config)"
    return None


def _intact_records(fs, file: str, count: int, size: int, compressed: bool) -> tuple[int, tuple[int, ...]]:
    """How many leading records of a short chunk are wholly present, and the chunk's offset table."""
    header = 4 * (count + 2)
    if compressed or size < header:
        return 0, ()
    with fs.open(file, "rb") as f:
        head = f.read(header)
    if len(head) < header or struct.unpack_from("<I", head)[0] != count:
        return 0, ()
    offsets = struct.unpack_from(f"<{count + 1}I", head, 4)
    intact = 0
    while intact < count and offsets[intact] <= offsets[intact + 1] <= size:
        intact += 1
    return intact, offsets


def scan_chunks(bucket_dir: str) -> list[ChunkDamage]:
    """The damaged chunks of one bucket dataset (empty when all are whole)."""
    fs, path = _fs(bucket_dir)
    index = _index(fs, path)
    sizes = {str(e["name"]).rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in fs.ls(path, detail=True)}
    config = index.get("config") or {}
    compressed = bool(config.get("compression")) or bool(config.get("encryption"))
    damage, first = [], 0
    for chunk in index.get("chunks", []):
        count, expected, name = int(chunk["chunk_size"]), int(chunk["chunk_bytes"]), chunk["filename"]
        actual = sizes.get(name, -1)
        if actual < expected:
            intact, offsets = _intact_records(fs, f"{path.rstrip('/')}/{name}", count, actual, compressed) if actual > 0 else (0, ())
            if not compressed and actual > 0 and offsets and offsets[:1] != (4 * (count + 2),):
                intact, offsets = 0, ()  # a header that does not describe this chunk: trust nothing in it
            damage.append(ChunkDamage(name, first, count, expected, actual, intact, offsets))
        first += count
    return damage


class ChunkSalvage:
    """Reads the intact records of one bucket's short chunks; everything else goes through LitData."""

    def __init__(self, bucket_dir: str, damage: list[ChunkDamage]):
        self.bucket_dir, self.damage = bucket_dir, damage
        self._loader = None

    def covers(self, index: int) -> ChunkDamage | None:
        return next((d for d in self.damage if d.first <= index < d.first + d.count), None)

    def _deserialiser(self):
        if self._loader is None:
            from litdata.streaming.item_loader import PyTreeLoader
            from litdata.streaming.serializers import _get_serializers
            from litdata.utilities._pytree import treespec_loads

            fs, path = _fs(self.bucket_dir)
            index = _index(fs, path)
            config = dict(index["config"])
            config["data_spec"] = treespec_loads(config["data_spec"]) if config.get("data_spec") else None
            loader = PyTreeLoader()
            loader.setup(config, index["chunks"], _get_serializers(None))
            self._loader = loader
        return self._loader

    def read(self, index: int) -> Any | None:
        """The record, or None when its bytes are past the cut."""
        chunk = self.covers(index)
        k = index - chunk.first if chunk is not None else -1
        if chunk is None or k >= chunk.intact:
            return None
        fs, path = _fs(self.bucket_dir)
        with fs.open(f"{path.rstrip('/')}/{chunk.filename}", "rb") as f:
            f.seek(chunk.offsets[k])
            raw = f.read(chunk.offsets[k + 1] - chunk.offsets[k])
        return self._deserialiser().deserialize(raw)
