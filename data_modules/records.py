"""Reading and validating raw inputs: image folders with sidecar captions, JSONL/CSV manifests, and the
record-level helpers the container readers share (`data_modules.webdataset_tars`, `data_modules.parquet_files`).

Every failure is a named skip reason (counted in the prepare report), never an exception that stops a
long job: a bad manifest row or caption becomes a `Record` with `skip` set, a bad image raises `Skip`
when it is decoded. Only a manifest that cannot be a manifest at all (missing, no `path` column, not a
single JSON line) is a one-line DataError.

Text encodings are handled deliberately, never with replacement characters: a byte-order mark decides
(UTF-8/16/32), otherwise the bytes must be valid in the configured encoding (UTF-8 unless
`--caption-encoding` says e.g. gb18030); undecodable captions or manifest lines are skipped and counted
(`caption_encoding`, `manifest_encoding`), and captions that already carry U+FFFD (replaced upstream) or
control characters are skipped too.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import stat
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageFile, ImageOps

from data_modules.metadata_filters import MetadataFilter, filter_reason
from lit_ovis.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
CAPTION_SUFFIX = ".txt"
Image.MAX_IMAGE_PIXELS = 1 << 28  # refuse decompression bombs beyond ~268 MP
CAPTION_MAX_BYTES = 1 << 20  # a sidecar caption file beyond 1 MiB is not a caption (and is never read whole)
# Byte-order marks, longest first (the UTF-32 LE mark starts with the UTF-16 LE one).
BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
        (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


@dataclass
class Record:
    id: str
    caption: str
    path: str | None = None  # None for synthetic records
    language: str = "en"
    target_text: str = ""
    synthetic_index: int | None = None
    skip: str | None = None  # a reason known before decoding (bad manifest row, undecodable caption)
    data: bytes | None = None  # the encoded image itself (a tar member, a Parquet cell) instead of a file path


class Skip(Exception):
    """A record dropped for a named reason."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def decode_text(data: bytes, encoding: str = "utf-8") -> str | None:
    """`data` as text: a byte-order mark picks UTF-8/16/32, otherwise `encoding`, strictly. None when the
    bytes are not valid in that encoding (the caller skips and counts; nothing is replaced)."""
    codec = next((name for bom, name in BOMS if data.startswith(bom)), encoding)
    try:
        return data.decode(codec)
    except (UnicodeDecodeError, LookupError):
        return None


def _regular_file(path: Path) -> bool:
    """True for a regular file (after symlinks): a FIFO or device named like an image would block or never end."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def read_caption(path: Path, encoding: str = "utf-8") -> tuple[str, str | None]:
    """(caption, skip reason or None) of a sidecar caption file."""
    if not path.exists():
        return "", "missing_caption"
    if not _regular_file(path):
        return "", "caption_unreadable"
    try:
        with open(path, "rb") as f:
            data = f.read(CAPTION_MAX_BYTES + 1)
    except OSError:
        return "", "caption_unreadable"
    return caption_from_bytes(data, encoding)


def caption_from_bytes(data: bytes | None, encoding: str = "utf-8") -> tuple[str, str | None]:
    """(caption, skip reason or None) of caption bytes (a sidecar file's, a tar's .txt member): the same rules."""
    if data is None:
        return "", "missing_caption"
    if len(data) > CAPTION_MAX_BYTES:
        return "", "long_caption"
    text = decode_text(data, encoding)
    return ("", "caption_encoding") if text is None else (text.strip(), None)


@dataclass(frozen=True)
class ReaderOptions:
    """How the container readers (tars, Parquet) and manifests find a record's fields and filter it."""

    caption_field: str = "caption"
    image_field: str = "image"
    encoding: str = "utf-8"
    filters: tuple[MetadataFilter, ...] = ()


def records_from_folder(folder: str | Path, encoding: str = "utf-8") -> list[Record]:
    """Every image under `folder` with its sidecar `<name>.txt` caption; other files (not hidden, not
    captions) are counted as `not_an_image` so nothing in the folder is ignored silently."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"--image-dir {folder}: folder not found; pass a folder of images with sidecar .txt captions")
    out = []
    for path in sorted(p for p in folder.rglob("*") if not p.is_dir() and not any(part.startswith(".") for part in p.relative_to(folder).parts)):
        rel = str(path.relative_to(folder))
        suffix = path.suffix.lower()
        if suffix == CAPTION_SUFFIX:
            continue
        if suffix not in IMAGE_SUFFIXES:
            out.append(Record(id=rel, caption="", path=str(path), skip="not_an_image"))
            continue
        caption, skip = read_caption(path.with_suffix(CAPTION_SUFFIX), encoding)
        out.append(Record(id=rel, caption=caption, path=str(path), skip=skip))
    return out


def _manifest_lines(manifest: Path, encoding: str) -> Iterator[tuple[int, str | None]]:
    """(line number, text or None when undecodable), streamed: a manifest is never read whole."""
    with open(manifest, "rb") as f:
        head = f.read(4)
        f.seek(0)
        if any(head.startswith(bom) for bom, name in BOMS if name != "utf-8-sig"):
            # UTF-16/32: lines are not split on b"\n"; such files are decoded whole, and must decode.
            text = decode_text(f.read(), encoding)
            if text is None:
                raise DataError(f"--manifest {manifest}: starts with a UTF-16/32 byte-order mark but is not valid in that encoding; re-save it as UTF-8")
            yield from enumerate(text.splitlines(keepends=True), 1)
            return
        for n, raw in enumerate(f, 1):
            yield n, decode_text(raw, encoding)


def _row_record(i: int, row, base: Path, caption_field: str = "caption", filters: tuple[MetadataFilter, ...] = ()) -> Record:
    """A manifest row as a Record; a row that cannot be one keeps its reason in `skip`. The row's other keys are its
    metadata (`filters`)."""
    rid = f"{i:08d}:"
    if not isinstance(row, dict):
        return Record(id=rid, caption="", skip="manifest_bad_row")
    path = row.get("path")
    if not isinstance(path, str) or not path.strip():
        return Record(id=rid, caption="", skip="missing_path")
    rid += path
    language = row.get("language") or "en"
    caption, caption_zh, target = row.get(caption_field), row.get("caption_zh"), row.get("target_text") or ""
    if not all(isinstance(v, str) for v in (language, target)) or not isinstance(caption_zh, (str, type(None))):
        return Record(id=rid, caption="", skip="manifest_bad_row")
    if language == "zh" and caption_zh:
        caption = caption_zh
    full = Path(path) if Path(path).is_absolute() else base / path
    skip = "missing_caption" if caption is None else None if isinstance(caption, str) else "caption_not_text"
    skip = filter_reason(list(filters), row) or skip
    return Record(id=rid, caption=caption if isinstance(caption, str) else "", path=str(full), language=language, target_text=target, skip=skip)


def iter_manifest(manifest: str | Path, encoding: str = "utf-8", caption_field: str = "caption",
                  filters: tuple[MetadataFilter, ...] = ()) -> Iterator[Record]:
    """The records of a JSONL or CSV manifest (columns path, `caption_field`, optional language / caption_zh /
    target_text), streamed line by line. Bad rows (undecodable, not JSON, not an object, no usable path, a
    non-string caption) are skipped and counted; rows failing a metadata filter are skipped as its reason."""
    manifest = Path(manifest)
    if not manifest.exists():
        raise DataError(f"--manifest {manifest}: not found; pass a .jsonl or .csv with path, caption[, language]")
    if not _regular_file(manifest):
        raise DataError(f"--manifest {manifest}: not a regular file; pass a .jsonl or .csv with path, caption[, language]")
    base = manifest.parent
    if manifest.suffix.lower() == ".csv":
        yield from _iter_csv(manifest, encoding, base, caption_field, filters)
        return
    parsed = seen = 0
    for i, (n, text) in enumerate((n, t) for n, t in _manifest_lines(manifest, encoding) if t is None or t.strip()):
        seen += 1
        if text is None:
            yield Record(id=f"{i:08d}:", caption="", skip="manifest_encoding")
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError:
            yield Record(id=f"{i:08d}:", caption="", skip="manifest_bad_json")
            continue
        parsed += 1
        yield _row_record(i, row, base, caption_field, filters)
    if seen and not parsed:
        raise DataError(f"--manifest {manifest}: no line is JSON; a .jsonl manifest has one object per line with 'path' and 'caption' (use a .csv name for CSV)")


def _iter_csv(manifest: Path, encoding: str, base: Path, caption_field: str, filters: tuple[MetadataFilter, ...]) -> Iterator[Record]:
    lines = _manifest_lines(manifest, encoding)
    bad_lines: list[int] = []

    def decoded():  # undecodable lines are counted, not fed to the CSV reader
        for n, text in lines:
            if text is None:
                bad_lines.append(n)
            else:
                yield text

    reader = csv.reader(decoded())
    header = next(reader, None)
    if not header or "path" not in [h.strip().lstrip("\ufeff") for h in header]:
        raise DataError(f"--manifest {manifest}: the CSV header {header} has no 'path' column; required columns are path, caption")
    header = [h.strip().lstrip("\ufeff") for h in header]
    i = 0
    while True:
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error:  # e.g. a field beyond the csv module's size limit: this row only
            yield Record(id=f"{i:08d}:", caption="", skip="manifest_bad_row")
            i += 1
            continue
        while bad_lines:
            yield Record(id=f"{i:08d}:", caption="", skip="manifest_encoding")
            bad_lines.pop()
            i += 1
        if not values:
            continue
        yield _row_record(i, dict(zip(header, values)), base, caption_field, filters)
        i += 1
    for k in range(len(bad_lines)):
        yield Record(id=f"{i + k:08d}:", caption="", skip="manifest_encoding")


def records_from_manifest(manifest: str | Path, encoding: str = "utf-8", caption_field: str = "caption",
                          filters: tuple[MetadataFilter, ...] = ()) -> list[Record]:
    """Every record of a manifest (`iter_manifest`) as a list."""
    return list(iter_manifest(manifest, encoding, caption_field, filters))


def load_image(path: str, conversions: list[str] | None = None) -> Image.Image:
    """Decode the file fully (catches truncation), apply the EXIF orientation (phone photos are stored sideways),
    and normalise to 8-bit RGB (CMYK, alpha, palette, 16-bit, float). Each conversion made is appended to
    `conversions` (counted in the prepare report); anything unusable raises Skip with its reason."""
    if path is None:
        raise Skip("missing_path")
    if not os.path.lexists(path):
        raise Skip("missing_file")
    if not _regular_file(Path(path)):
        raise Skip("not_a_file")  # a FIFO, device or directory named like an image: reading it could block
    return _decode(path, conversions)


def load_image_grouped(records: list[Record], multiple: int) -> tuple[dict[tuple[int, int], list[tuple[Record, np.ndarray]]], int]:
    """Images of `records` centre-cropped to sides that are multiples of `multiple` (what a VAE with that
    downsampling reads), grouped by (width, height) so each group stacks into one batch. Returns the groups and
    how many records were skipped (unreadable, or smaller than `multiple` on a side)."""
    groups: dict[tuple[int, int], list[tuple[Record, np.ndarray]]] = {}
    skipped = 0
    for record in records:
        try:
            image = load_image(record.path)
        except Skip:
            skipped += 1
            continue
        w, h = image.width // multiple * multiple, image.height // multiple * multiple
        if w < multiple or h < multiple:
            skipped += 1
            continue
        left, top = (image.width - w) // 2, (image.height - h) // 2
        pixels = np.asarray(image.crop((left, top, left + w, top + h)), dtype=np.uint8)
        groups.setdefault((w, h), []).append((record, pixels))
    return groups, skipped


def decode_image(data: bytes, conversions: list[str] | None = None) -> Image.Image:
    """`load_image` for an image held in memory (a tar member, a Parquet cell): the same checks and conversions."""
    if not data:
        raise Skip("corrupt")
    return _decode(io.BytesIO(data), conversions)


def _decode(source, conversions: list[str] | None) -> Image.Image:
    done = conversions if conversions is not None else []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            ImageFile.LOAD_TRUNCATED_IMAGES = False
            img = Image.open(source)
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise Skip("too_large") from None
    except PermissionError:
        raise Skip("unreadable_file") from None
    except Exception:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise Skip("corrupt") from None
    try:
        return _to_rgb(img, done)
    except Skip:
        raise
    except Exception:  # noqa: BLE001 - a decodable file whose pixels cannot be converted is still corrupt
        raise Skip("corrupt") from None


DEEP_GREY = ("I;16", "I;16B", "I;16L", "I", "F")
# How a non-RGB image is counted in the report (`converted`): one kind per image, named after its mode.
CONVERSION_KIND = {**{m: "deep_grey" for m in DEEP_GREY}, "P": "palette", "PA": "palette", "RGBA": "alpha", "LA": "alpha",
                   "La": "alpha", "RGBa": "alpha", "L": "grey"}


def _to_rgb(img: Image.Image, done: list[str]) -> Image.Image:
    img = _apply_exif_orientation(img, done)
    mode = img.mode
    if mode in DEEP_GREY:
        # Deep (16/32-bit integer, float) grey: stretch its range to 8 bits in float32 (half the memory of
        # float64; bombs are refused above) instead of letting convert() clip everything to white.
        arr = np.array(img, dtype=np.float32)  # a writable copy: scaled in place below
        if not np.isfinite(arr).all():
            raise Skip("corrupt")
        low, span = float(arr.min()), float(np.ptp(arr))
        arr -= low
        arr *= 255.0 / max(span, 1.0)
        img = Image.fromarray(arr.astype(np.uint8), "L")
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", img.size, (255, 255, 255))  # transparent areas become white
        background.paste(rgba, mask=rgba.split()[-1])
        img = background
    if mode != "RGB":
        done.append(CONVERSION_KIND.get(mode, mode.lower()))  # cmyk, 1, ycbcr, lab, hsv, ...
    return img.convert("RGB")


def _apply_exif_orientation(img: Image.Image, done: list[str]) -> Image.Image:
    try:
        if img.getexif().get(0x0112, 1) in (1, None):  # upright: no transposed copy of a large image
            return img
        rotated = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a malformed EXIF block does not make the pixels unusable
        return img
    done.append("exif_rotated")
    return rotated


def check_caption(caption, max_chars: int) -> str:
    """The caption as trained on (whitespace runs collapsed), or Skip: not text, control characters or
    U+FFFD (text already damaged by a lossy decode upstream), empty, too long."""
    if not isinstance(caption, str):
        raise Skip("caption_not_text")
    if "\ufffd" in caption:
        raise Skip("caption_replacement_char")
    caption = " ".join(caption.split())
    if any(unicodedata.category(c) == "Cc" for c in caption):
        raise Skip("caption_control_chars")
    if not caption:
        raise Skip("empty_caption")
    if len(caption) > max_chars:
        raise Skip("long_caption")
    return caption


def synthetic_records(n: int) -> list[Record]:
    """N records rendered on the fly by the synthetic text engine (`data_modules.synthetic`)."""
    return [Record(id=f"syn-{i:08d}", caption="", synthetic_index=i) for i in range(n)]


def add_source_options(parser, containers: bool = False) -> None:
    """The input of `prepare` and `make-pairs`: exactly one of an image folder, a manifest or the synthetic engine;
    with `containers` (prepare) also WebDataset tar shards or Parquet files (`data_modules.sources`)."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--image-dir", help="folder of images with sidecar .txt captions")
    src.add_argument("--manifest", help="JSONL or CSV with path, caption[, language, caption_zh, target_text]")
    src.add_argument("--synthetic", type=int, metavar="N", help="N samples of the synthetic text-rendering engine")
    if containers:
        src.add_argument("--tar", metavar="PATTERN",
                         help="WebDataset / img2dataset tar shards (image + .txt/.json per sample): a path or URL (s3://, gs://, ...) "
                              "with {000..099} ranges or * globs, e.g. 's3://bucket/laion/{00000..00999}.tar'")
        src.add_argument("--parquet", metavar="PATTERN",
                         help="Parquet files with an image column (bytes, a Hugging Face image struct, or a path) and a caption "
                              "column (--image-field, --caption-field); a path or URL with ranges or globs")


def records_from_options(args, encoding: str = "utf-8") -> list[Record]:
    """The records `add_source_options` asked for; captions and manifests read as `encoding` (no byte-order mark)."""
    if args.synthetic is not None:
        return synthetic_records(args.synthetic)
    if args.image_dir:
        return records_from_folder(args.image_dir, encoding)
    return records_from_manifest(args.manifest, encoding)

