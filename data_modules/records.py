"""Reading and validating raw inputs: image folders with sidecar captions, JSONL/CSV manifests.

Every failure is a named skip reason (counted in the prepare report), never an exception that stops a
long job.
"""

from __future__ import annotations

import csv
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from lit_ovis.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
Image.MAX_IMAGE_PIXELS = 1 << 28  # refuse decompression bombs beyond ~268 MP


@dataclass
class Record:
    id: str
    caption: str
    path: str | None = None  # None for synthetic records
    language: str = "en"
    target_text: str = ""
    synthetic_index: int | None = None


class Skip(Exception):
    """A record dropped for a named reason."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def records_from_folder(folder: str | Path) -> list[Record]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found; pass --image-dir with images and sidecar .txt captions")
    out = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        txt = path.with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8", errors="replace").strip() if txt.exists() else None
        out.append(Record(id=str(path.relative_to(folder)), caption=caption if caption is not None else "\0missing", path=str(path)))
    return out


def records_from_manifest(manifest: str | Path) -> list[Record]:
    """JSONL or CSV with columns path, caption, optional language / caption_zh / target_text."""
    manifest = Path(manifest)
    if not manifest.exists():
        raise DataError(f"{manifest}: manifest not found; pass --manifest with a .jsonl or .csv (path, caption[, language])")
    base = manifest.parent
    rows: list[dict] = []
    if manifest.suffix == ".csv":
        with open(manifest, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        for n, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataError(f"{manifest}:{n}: not valid JSON; each line must be an object with 'path' and 'caption'") from None
    out = []
    for i, row in enumerate(rows):
        if "path" not in row:
            raise DataError(f"{manifest}: row {i + 1} has no 'path' column; required columns are path, caption")
        path = Path(row["path"])
        path = path if path.is_absolute() else base / path
        language = row.get("language") or "en"
        caption = row.get("caption") or ""
        if language == "zh" and row.get("caption_zh"):
            caption = row["caption_zh"]
        out.append(Record(id=f"{i:08d}:{row['path']}", caption=caption, path=str(path), language=language, target_text=row.get("target_text") or ""))
    return out


def load_image(path: str) -> Image.Image:
    """Decode fully (catches truncation), apply the EXIF orientation (phone photos are stored sideways),
    and normalise to 8-bit RGB (CMYK, alpha, palette, 16-bit)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            ImageFile.LOAD_TRUNCATED_IMAGES = False
            img = Image.open(path)
            img.load()
    except FileNotFoundError:
        raise Skip("missing_file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise Skip("too_large") from None
    except Exception:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise Skip("corrupt") from None
    img = _apply_exif_orientation(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        arr = (arr - arr.min()) / max(float(np.ptp(arr)), 1.0) * 255.0
        img = Image.fromarray(arr.astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").split()[-1])
        img = background
    return img.convert("RGB")


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a malformed EXIF block does not make the pixels unusable
        return img


def check_caption(caption: str, max_chars: int) -> str:
    if caption == "\0missing":
        raise Skip("missing_caption")
    caption = " ".join(caption.split())
    if not caption:
        raise Skip("empty_caption")
    if len(caption) > max_chars:
        raise Skip("long_caption")
    return caption
