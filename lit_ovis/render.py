"""Small text-drawing helpers shared by sample grids and galleries (font lookup that covers CJK)."""

from __future__ import annotations

import functools
import glob

from PIL import Image, ImageDraw, ImageFont

LATIN_FONTS = ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"]
CJK_FONTS = ["/usr/share/fonts/truetype/wqy/wqy-microhei.ttc", "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc"]


def has_cjk(text: str) -> bool:
    return any("\u3000" <= ch <= "\u9fff" or "\uff00" <= ch <= "\uffef" for ch in text)


@functools.lru_cache(maxsize=32)
def _font(path: str | None, size: int):
    if path is None:
        return ImageFont.load_default()
    return ImageFont.truetype(path, size)


def load_font(size: int, text: str = "") -> ImageFont.FreeTypeFont:
    """A TrueType font that can draw `text` (CJK font when needed), or PIL's default if none is installed."""
    candidates = (CJK_FONTS + LATIN_FONTS) if has_cjk(text) else (LATIN_FONTS + CJK_FONTS)
    candidates += glob.glob("/usr/share/fonts/truetype/**/*.tt[fc]", recursive=True)
    for path in candidates:
        try:
            return _font(path, size)
        except OSError:
            continue
    return _font(None, size)


def caption_strip(text: str, width: int, height: int, font) -> Image.Image:
    """A white strip with `text` cut to fit the width."""
    strip = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(strip)
    line = text
    while line and draw.textlength(line, font=font) > width - 6:
        line = line[:-2] + "…" if len(line) > 2 else ""
    draw.text((3, 2), line, fill="black", font=font)
    return strip
