"""The inputs of `prepare` as an ordered sequence of units of work, streamed, never loaded whole.

A unit is what one rank prepares alone:
- list sources (an image folder, a JSONL/CSV manifest, the synthetic engine, a list of Records): `shard_size`
  consecutive records, i.e. one restart-cache shard, keyed by its records' content;
- container sources: one WebDataset tar, or one row group of a Parquet file, keyed by the file's identity (URL,
  size, modification time or ETag) and read only by the rank that owns it; its records are cut into shards of
  `shard_size` as they stream in.

Every rank lists the same units in the same order (a listing: file names, footers, manifest lines; never image
bytes), and rank r of W takes units r, r + W, r + 2W, ... (`owned`). Paths may be local or any fsspec URL
(s3://, gs://, ...; the filesystem's package, e.g. s3fs, must be installed); a pattern may hold `{000..099}`
ranges and comma lists (braceexpand, WebDataset's syntax) and `*` globs.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from data_modules.metadata_filters import parse_filters
from data_modules.records import ReaderOptions, Record, iter_manifest, records_from_folder
from lit_ovis.errors import ConfigError, DataError

GLOB_CHARS = "*?["


@dataclass
class Unit:
    """One unit of work. List units carry their records; container units open theirs lazily."""

    index: int
    name: str
    records: list[Record] | None = None
    identity: list | None = None  # container units: what their cache key is made of
    opener: Callable[[], Iterator[Record]] | None = None
    size: int | None = None  # records, when known without reading them

    def read(self) -> Iterator[Record]:
        return iter(self.records) if self.records is not None else self.opener()


def owned(units: Iterable[Unit], rank: int, world: int) -> Iterator[Unit]:
    """The units rank `rank` of `world` prepares: every world-th one, starting at its rank."""
    return (u for u in units if u.index % world == rank)


class Source:
    """An ordered input. `units` lists it; `count` says how many records it holds (for the storage plan)."""

    description = "input"

    def units(self, shard_size: int) -> Iterator[Unit]:
        raise NotImplementedError

    def count(self) -> tuple[int | None, str]:
        """(records, how they were counted: "exact" or what the estimate rests on)."""
        raise NotImplementedError


class RecordSource(Source):
    """Records from a list, or streamed from a factory (a manifest is read line by line on every pass)."""

    def __init__(self, records: list[Record] | Callable[[], Iterable[Record]], description: str = "records", size: int | None = None):
        self._records = records
        self.description = description
        self._size = len(records) if isinstance(records, list) else size

    def _iter(self) -> Iterator[Record]:
        return iter(self._records) if isinstance(self._records, list) else iter(self._records())

    def units(self, shard_size: int) -> Iterator[Unit]:
        it = self._iter()
        for index in itertools.count():
            chunk = list(itertools.islice(it, shard_size))
            if not chunk:
                return
            yield Unit(index, f"{self.description} records {index * shard_size}-{index * shard_size + len(chunk) - 1}", records=chunk, size=len(chunk))

    def count(self) -> tuple[int | None, str]:
        if self._size is None:
            self._size = sum(1 for _ in self._iter())
        return self._size, "exact"


class SyntheticSource(RecordSource):
    """N renders of the synthetic engine: counted without listing, units made on demand (100M costs nothing)."""

    def __init__(self, n: int):
        super().__init__(lambda: synthetic_records_range(0, n), "synthetic", size=n)
        self.n = n

    def units(self, shard_size: int) -> Iterator[Unit]:
        for index, start in enumerate(range(0, self.n, shard_size)):
            chunk = synthetic_records_range(start, min(start + shard_size, self.n))
            yield Unit(index, f"synthetic {start}-{start + len(chunk) - 1}", records=chunk, size=len(chunk))


def synthetic_records_range(start: int, stop: int) -> list[Record]:
    return [Record(id=f"syn-{i:08d}", caption="", synthetic_index=i) for i in range(start, stop)]


# ------------------------------------------------------------------------------------------ files and URLs
def expand(pattern: str, option: str) -> list[str]:
    """Every path a pattern names, in order: brace ranges expanded, then globs matched (sorted)."""
    from braceexpand import braceexpand

    out: list[str] = []
    for name in braceexpand(pattern):
        if any(c in name for c in GLOB_CHARS):
            fs, _ = _fs(name, option)
            local = _is_local(fs)
            out += [m if local else fs.unstrip_protocol(m) for m in sorted(fs.glob(name))]
        else:
            out.append(name)
    if not out:
        raise DataError(f"{option} {pattern}: no file matches; check the path, the {{000..099}} range or the * glob")
    return out


def _is_local(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return bool({"file", "local"} & set(protocols))


def _fs(url: str, option: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:
        raise ConfigError(f"{option} {url}: cannot open this kind of URL ({str(err).splitlines()[0]}); "
                          "install the fsspec package for its storage (e.g. s3fs, gcsfs)") from None


def file_identity(url: str, option: str) -> list | None:
    """[url, size, version] of a file (None when it does not exist): a changed file gets a new cache key."""
    fs, path = _fs(url, option)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None
    version = next((info[k] for k in ("ETag", "etag", "mtime", "LastModified", "last_modified", "created", "md5") if info.get(k) is not None), None)
    return [url, info.get("size"), str(version)]


def _missing(index: int, url: str) -> Unit:
    return Unit(index, url, identity=[url, None, "missing"], opener=lambda: iter([Record(id=url, caption="", skip="missing_file")]), size=1)


class TarSource(Source):
    """WebDataset / img2dataset tar shards: one unit per tar (`data_modules.webdataset_tars`)."""

    option = "--tar"

    def __init__(self, pattern: str, opts: ReaderOptions):
        self.urls = expand(pattern, self.option)
        self.opts = opts
        self.description = f"{len(self.urls)} tar file(s) {pattern}"

    def units(self, shard_size: int) -> Iterator[Unit]:
        for index, url in enumerate(self.urls):
            identity = file_identity(url, self.option)
            if identity is None:
                yield _missing(index, url)
                continue
            yield Unit(index, url, identity=["tar", *identity], opener=self._opener(url, identity[1]))

    def _opener(self, url: str, size: int | None) -> Callable[[], Iterator[Record]]:
        from data_modules.webdataset_tars import tar_records

        def read() -> Iterator[Record]:
            fs, path = _fs(url, self.option)
            with fs.open(path, "rb") as f:
                yield from tar_records(url, f, self.opts, size)

        return read

    def count(self) -> tuple[int | None, str]:
        """img2dataset's `<name>_stats.json` (successes) where present, local tars by their headers; remote tars
        without stats are estimated from the first one's samples per byte (it is read once), and said so."""
        from data_modules.webdataset_tars import count_tar_samples

        damaged: list[str] = []

        def scan(fs, path) -> int:
            try:
                with fs.open(path, "rb") as f:
                    return count_tar_samples(f)
            except Exception:  # noqa: BLE001 - a damaged tar counts as empty here; reading it counts the damage
                damaged.append(path)
                return 0

        total, unknown = 0, []
        for url in self.urls:
            fs, path = _fs(url, self.option)
            stats = path[: -len(".tar")] + "_stats.json" if path.endswith(".tar") else None
            try:
                if stats and fs.exists(stats):
                    with fs.open(stats, "rb") as f:
                        total += int(json.loads(f.read())["successes"])
                    continue
            except (ValueError, KeyError, TypeError, OSError):
                pass  # unreadable stats: count the tar itself
            if not fs.exists(path):
                continue
            if _is_local(fs):
                total += scan(fs, path)
            else:
                unknown.append((fs, path, fs.info(path).get("size") or 0))
        if not unknown:
            return total, "exact" if not damaged else f"exact but for {len(damaged)} damaged tar(s), counted as empty"
        fs, path, size = unknown[0]
        per_byte = scan(fs, path) / size if size else 0.0
        return total + round(per_byte * sum(s for _, _, s in unknown)), f"estimated for {len(unknown)} tar(s) from {path}'s samples per byte"


class ParquetSource(Source):
    """Parquet files: one unit per row group (`data_modules.parquet_files`)."""

    option = "--parquet"

    def __init__(self, pattern: str, opts: ReaderOptions):
        self.urls = expand(pattern, self.option)
        self.opts = opts
        self.description = f"{len(self.urls)} Parquet file(s) {pattern}"
        self._groups: list[tuple[str, list | None, list[int] | None]] | None = None

    def _listing(self) -> list[tuple[str, list | None, list[int] | None]]:
        """(url, identity, rows per row group) per file; rows None when its footer cannot be read."""
        from data_modules.parquet_files import row_groups

        if self._groups is None:
            self._groups = []
            for url in self.urls:
                identity = file_identity(url, self.option)
                rows = None
                if identity is not None:
                    fs, path = _fs(url, self.option)
                    try:
                        with fs.open(path, "rb") as f:
                            rows = row_groups(f)
                    except Exception:  # noqa: BLE001 - pyarrow raises several types for a damaged footer
                        rows = None
                self._groups.append((url, identity, rows))
        return self._groups

    def units(self, shard_size: int) -> Iterator[Unit]:
        from data_modules.parquet_files import parquet_records

        index = 0
        for url, identity, rows in self._listing():
            if identity is None:
                yield _missing(index, url)
                index += 1
                continue
            if rows is None:
                yield Unit(index, url, identity=["parquet", *identity, "unreadable"],
                           opener=lambda url=url: iter([Record(id=url, caption="", skip="parquet_unreadable")]), size=1)
                index += 1
                continue
            base = url.rsplit("/", 1)[0] if "/" in url else ""
            for group, n in enumerate(rows):

                def read(url=url, group=group, n=n) -> Iterator[Record]:
                    fs, path = _fs(url, self.option)
                    with fs.open(path, "rb") as f:
                        yield from parquet_records(url, f, group, n, base, self.opts)

                yield Unit(index, f"{url} row group {group}", identity=["parquet", *identity, group], opener=read, size=n)
                index += 1

    def count(self) -> tuple[int | None, str]:
        return sum(sum(rows) if rows is not None else 1 for _, identity, rows in self._listing() if identity is not None) + \
            sum(1 for _, identity, _ in self._listing() if identity is None), "exact"


# ------------------------------------------------------------------------------------------ options
def reader_options(cfg) -> ReaderOptions:
    """How records are read, from prepare's settings (caption/image fields, encoding, metadata filters)."""
    return ReaderOptions(caption_field=cfg.caption_field, image_field=cfg.image_field, encoding=cfg.caption_encoding,
                         filters=tuple(parse_filters(cfg.metadata_filters)))


def source_from_options(args, cfg) -> Source:
    """The input `add_source_options(..., containers=True)` asked for."""
    opts = reader_options(cfg)
    if getattr(args, "tar", None):
        return TarSource(args.tar, opts)
    if getattr(args, "parquet", None):
        return ParquetSource(args.parquet, opts)
    if opts.filters and (args.image_dir or args.synthetic is not None):
        raise ConfigError("--metadata-filters: image folders and the synthetic engine carry no metadata; filter a manifest, tars or Parquet files")
    if args.synthetic is not None:
        return SyntheticSource(args.synthetic)
    if args.image_dir:
        return RecordSource(records_from_folder(args.image_dir, opts.encoding), f"folder {args.image_dir}")
    manifest = Path(args.manifest)
    first = iter_manifest(manifest, opts.encoding, opts.caption_field, opts.filters)
    next(first, None)  # a missing or unusable manifest fails here, before any work, in one line
    return RecordSource(lambda: iter_manifest(manifest, opts.encoding, opts.caption_field, opts.filters), f"manifest {manifest}")


def as_source(inputs: list[Record] | Source) -> Source:
    return inputs if isinstance(inputs, Source) else RecordSource(list(inputs))
