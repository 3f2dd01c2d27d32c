"""WebDataset / img2dataset tar shards as records, streamed member by member (never read whole) from a local path
or any fsspec URL.

A sample is a run of consecutive members sharing a key (the member path up to the first dot of its file name:
WebDataset's rule): an image (.jpg, .png, .webp, ...), a caption (.txt) and metadata (.json: img2dataset's url,
width, height, scores). The caption is the sample's `.<caption_field>` member when it has one, else its .json's
`caption_field` key, else its .txt member. Image bytes, captions and metadata then follow the rules of every other
input (`data_modules.records`: decoding, encodings, filters, skip reasons).

Damage is skipped and counted, never fatal:
- a region that is not a valid member (a damaged header, a torn write): `tar_corrupt`, once per region; reading
  resumes at the next valid header, so the members after it are kept (also after a valid pax header whose member
  header is damaged, in uncompressed tars, which webdataset writes with a pax header per member);
- a tar cut short: `tar_truncated` (the sample being read is lost, every earlier one is kept);
- a tar that cannot be opened at all: `tar_unreadable`;
- a sample without an image member: `missing_image`; with a .json that is not a JSON object: `metadata_corrupt`;
  with an image member over `MEMBER_MAX_BYTES`: `too_large` (never read into memory).
"""

from __future__ import annotations

import json
import tarfile
import zlib
from typing import IO, Iterator

from data_modules.records import IMAGE_SUFFIXES, ReaderOptions, Record, caption_from_bytes, decode_text
from data_modules.metadata_filters import filter_reason

BLOCK = tarfile.BLOCKSIZE
MEMBER_MAX_BYTES = 1 << 28  # 256 MiB: no caption, metadata or picture of a training pair is larger
IMAGE_EXTENSIONS = tuple(s.lstrip(".") for s in sorted(IMAGE_SUFFIXES))


def member_key(name: str) -> tuple[str, str]:
    """(sample key, extension) of a member name: `dir/000123.jpg` -> (`dir/000123`, `jpg`)."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def iter_tar_samples(fileobj: IO[bytes], size: int | None = None) -> Iterator[tuple[str, dict[str, bytes] | None, str | None]]:
    """(key, {extension: bytes}, None) per sample in member order, or (key, None, reason) for a damaged one.
    `size` (the file's length, when known) reveals a tar cut inside a header block."""
    key: str | None = None
    members: dict[str, bytes] = {}
    oversized = False
    base = 0  # where the current tarfile stream starts in the file (> 0 after resuming past damage)
    expected = 0  # where the next header starts, relative to `base`, when nothing is damaged
    while True:
        try:
            tar = tarfile.open(fileobj=fileobj, mode="r|*", ignore_zeros=True)
        except (tarfile.TarError, EOFError, OSError, zlib.error):
            yield ("", None, "tar_unreadable") if base == 0 else (key or "", None, "tar_truncated")
            return
        expected, resumed = 0, base > 0
        try:
            for info in tar:
                if info.offset > expected and not resumed:  # ignore_zeros skipped blocks that were not a header
                    yield "", None, "tar_corrupt"
                resumed = False  # the region before a resume point is counted once, where it was found
                expected = info.offset_data + (-(-info.size // BLOCK) * BLOCK if info.isreg() else 0)
                if not info.isreg():
                    continue
                k, ext = member_key(info.name)
                if k != key:
                    if key is not None:
                        yield (key, None, "too_large") if oversized else (key, members, None)
                    key, members, oversized = k, {}, False
                if info.size > MEMBER_MAX_BYTES:
                    oversized = True  # tarfile skips its bytes when it moves on
                    continue
                handle = tar.extractfile(info)
                members[ext] = handle.read() if handle is not None else b""
        except (tarfile.TarError, EOFError, OSError, zlib.error):
            # E.g. a valid extended (pax / GNU) header followed by a damaged one: tarfile gives up on the whole stream
            # (ignore_zeros only skips damaged first headers). In an uncompressed, seekable tar with data left after
            # the failing header, resume one block further on (the region counts once as `tar_corrupt`); otherwise
            # the data ends here.
            resume = base + expected + BLOCK
            if getattr(tar.fileobj, "comptype", None) == "tar" and fileobj.seekable() and size is not None and resume < size:
                yield "", None, "tar_corrupt"
                fileobj.seek(resume)
                base = resume
                continue
            yield key or "", None, "tar_truncated"
            return
        break
    if key is not None:
        yield (key, None, "too_large") if oversized else (key, members, None)
    if size is not None and size % BLOCK:
        yield "", None, "tar_truncated"  # cut inside a header block: tarfile ends there without an error


def sample_record(rid: str, members: dict[str, bytes], opts: ReaderOptions) -> Record:
    """One sample's members as a Record (skip reason set when it cannot be used)."""
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
    meta: dict = {}
    skip = None
    if "json" in members:
        text = decode_text(members["json"], opts.encoding)
        try:
            parsed = json.loads(text) if text is not None else None
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            meta = parsed
        else:
            skip = "metadata_corrupt"
    if opts.caption_field in members:
        caption, caption_skip = caption_from_bytes(members[opts.caption_field], opts.encoding)
    elif opts.caption_field in meta:
        caption = meta[opts.caption_field]
        caption_skip = None if isinstance(caption, str) else "caption_not_text"
        caption = caption if isinstance(caption, str) else ""
    else:
        caption, caption_skip = caption_from_bytes(members.get("txt"), opts.encoding)
    language, target = meta.get("language"), meta.get("target_text")
    skip = ("missing_image" if image_ext is None else None) or skip or filter_reason(list(opts.filters), meta) or caption_skip
    return Record(id=rid, caption=caption, data=members.get(image_ext) if image_ext else None, skip=skip,
                  language=language if isinstance(language, str) and language else "en",
                  target_text=target if isinstance(target, str) else "")


def tar_records(name: str, fileobj: IO[bytes], opts: ReaderOptions, size: int | None = None) -> Iterator[Record]:
    """The records of one tar (`name` prefixes their ids: `<name>#<key>`), damage included as skipped records."""
    for key, members, reason in iter_tar_samples(fileobj, size):
        rid = f"{name}#{key}"
        yield Record(id=rid, caption="", skip=reason) if members is None else sample_record(rid, members, opts)


def count_tar_samples(fileobj: IO[bytes]) -> int:
    """Samples in a seekable tar, from its headers alone (tarfile seeks over the member data)."""
    keys, last = 0, None
    with tarfile.open(fileobj=fileobj, mode="r:*", ignore_zeros=True) as tar:
        for info in tar:
            if info.isreg():
                k = member_key(info.name)[0]
                keys += k != last
                last = k
    return keys
