"""Parquet files (e.g. a Hugging Face dataset exported with `to_parquet`, img2dataset's parquet output) as records,
streamed one row group at a time in batches of rows, reading only the columns that are used.

Columns: `image_field` holds the image as bytes, as a Hugging Face image struct (`{bytes, path}`: the bytes when
present, else the path) or as a path (relative paths are relative to the Parquet file's folder); `caption_field`
holds the caption; `language` and `target_text` are read when present; the columns named by metadata filters are
the record's metadata. Each row group is a unit of work, so a file's row groups spread over the ranks.

Damage is skipped and counted, never fatal: a file whose footer cannot be read counts once as
`parquet_unreadable`; a row group whose pages cannot be decoded counts each of its rows not yet read as
`parquet_corrupt`; a row without an image is `missing_image`; a caption that is not text is `caption_not_text`.
"""

from __future__ import annotations

import posixpath
from pathlib import Path
from typing import IO, Iterator

from data_modules.metadata_filters import filter_keys, filter_reason
from data_modules.records import ReaderOptions, Record
from lit_ovis.files import is_remote

BATCH_ROWS = 256  # rows decoded at a time: bounds memory by this many images, not by the row group's size


def row_groups(fileobj: IO[bytes]) -> list[int]:
    """Rows per row group, from the footer alone (raises on an unreadable footer)."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(fileobj).metadata
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def _columns(schema_names: list[str], opts: ReaderOptions) -> list[str]:
    wanted = [opts.image_field, opts.caption_field, "language", "target_text", *filter_keys(list(opts.filters))]
    return [c for c in dict.fromkeys(wanted) if c in schema_names]


def _image(value, base: str) -> tuple[bytes | None, str | None]:
    """(bytes, path) of an image cell: raw bytes, a {bytes, path} struct, or a path string."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"]), None
        value = value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return (bytes(value) or None), None
    if isinstance(value, str) and value.strip():
        if value.startswith("/") or is_remote(value) or not base:
            return None, value
        return None, posixpath.join(base, value) if is_remote(base) else str(Path(base) / value)
    return None, None


def row_record(rid: str, row: dict, base: str, opts: ReaderOptions) -> Record:
    data, path = _image(row.get(opts.image_field), base)
    caption = row.get(opts.caption_field)
    language, target = row.get("language"), row.get("target_text")
    skip = ("missing_image" if data is None and path is None else None) or filter_reason(list(opts.filters), row)
    if skip is None and caption is None:
        skip = "missing_caption"
    elif skip is None and not isinstance(caption, str):
        skip = "caption_not_text"
    return Record(id=rid, caption=caption if isinstance(caption, str) else "", path=path, data=data, skip=skip,
                  language=language if isinstance(language, str) and language else "en",
                  target_text=target if isinstance(target, str) else "")


def parquet_records(name: str, fileobj: IO[bytes], group: int, rows: int, base: str, opts: ReaderOptions) -> Iterator[Record]:
    """The records of row group `group` (`rows` rows) of one file; ids are `<name>#<group>:<row>`."""
    import pyarrow.parquet as pq

    done = 0
    try:
        pf = pq.ParquetFile(fileobj)
        if opts.image_field not in pf.schema_arrow.names:
            yield from (Record(id=f"{name}#{group}:{k}", caption="", skip="missing_image") for k in range(rows))
            return
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[group], columns=_columns(pf.schema_arrow.names, opts)):
            for row in batch.to_pylist():
                yield row_record(f"{name}#{group}:{done}", row, base, opts)
                done += 1
    except Exception:  # noqa: BLE001 - pyarrow raises OSError / ArrowInvalid / ArrowException for damaged pages
        yield from (Record(id=f"{name}#{group}:{k}", caption="", skip="parquet_corrupt") for k in range(done, rows))
