"""Small drawing helpers shared by sample grids, galleries and GRPO's rollout grid (font lookup that covers CJK)."""

from __future__ import annotations

import functools
import glob

import numpy as np
import torch
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


def reward_grid(images: torch.Tensor, rewards: torch.Tensor, nrow: int = 4) -> torch.Tensor:
    """[3, H', W'] grid of images in [0, 1], each stamped with its reward (for TensorBoard)."""
    n, _, h, w = images.shape
    ncol = min(nrow, n)
    rows = (n + ncol - 1) // ncol
    grid = torch.ones(3, rows * (h + 2), ncol * (w + 2))
    for i in range(n):
        arr = (images[i].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8)
        pil = Image.fromarray(arr)
        draw = ImageDraw.Draw(pil)
        draw.rectangle([0, 0, min(w, 40), 10], fill=(0, 0, 0))
        draw.text((1, -1), f"{float(rewards[i]):.3g}", fill=(255, 255, 0))
        img = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255
        r, c = divmod(i, ncol)
        grid[:, r * (h + 2): r * (h + 2) + h, c * (w + 2): c * (w + 2) + w] = img
    return grid
