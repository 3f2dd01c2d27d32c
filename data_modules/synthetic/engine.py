"""Synthetic text-rendering engine: images that contain English or Chinese text, with a caption that
quotes the rendered text exactly (the report's synthetic text data). Deterministic per (seed, index).

Variation: fonts (installed Latin and CJK TrueType fonts), sizes, colours, backgrounds (solid,
gradient, noise, photo-like texture), layouts (poster, title card, label, UI button, paragraph) and
aspect ratios.
"""

from __future__ import annotations

import glob
import math
import random
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from data_modules.synthetic.vocab import COLOURS, EN_WORDS, ZH_PHRASES

LAYOUTS = ("poster", "title_card", "label", "button", "paragraph")
BACKGROUNDS = ("solid", "gradient", "noise", "texture")
ASPECT_RATIOS = (1.0, 0.75, 4 / 3, 0.5, 2.0, 9 / 16, 16 / 9)
LAYOUT_NAMES_EN = {"poster": "A poster", "title_card": "A title card", "label": "A label", "button": "A UI button",
                   "paragraph": "A paragraph of text"}
LAYOUT_NAMES_ZH = {"poster": "海报", "title_card": "标题卡", "label": "标签", "button": "界面按钮", "paragraph": "文字段落"}
# Starting text size per layout, as a fraction of the image's short side (shrunk until the text fits).
LAYOUT_TEXT_SIZE = {"poster": 0.22, "title_card": 0.18, "label": 0.2, "button": 0.14, "paragraph": 0.09}

_LATIN_GLOBS = ["/usr/share/fonts/truetype/dejavu/*.ttf", "/usr/share/fonts/truetype/liberation*/*.ttf"]
_CJK_GLOBS = ["/usr/share/fonts/truetype/wqy/*.tt[fc]", "/usr/share/fonts/opentype/noto/*CJK*.tt[fc]"]


def _find(globs: list[str]) -> list[str]:
    return sorted({p for g in globs for p in glob.glob(g)})


@dataclass
class RenderedSample:
    image: Image.Image
    caption: str
    text: str
    language: str
    layout: str
    background: str
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RenderSpec:
    """Everything one rendered sample depends on, chosen by the caller (see `TextRenderingEngine.render_spec`)."""

    text: str
    language: str
    layout: str
    background: str
    bg: str  # background colour name (a key of COLOURS)
    fg: str  # text colour name
    size: tuple[int, int]  # (width, height) in pixels
    font: str  # TrueType file
    text_size: float  # starting text size as a fraction of the short side; shrunk until one line fits
    seed: str  # drives background noise / gradient and the caption's wording


class TextRenderingEngine:
    def __init__(self, seed: int = 0, base_size: int = 256, zh_fraction: float = 0.4, fonts_latin=None, fonts_cjk=None):
        self.seed = seed
        self.base_size = base_size
        self.latin_fonts = list(fonts_latin) if fonts_latin is not None else _find(_LATIN_GLOBS)
        self.cjk_fonts = list(fonts_cjk) if fonts_cjk is not None else _find(_CJK_GLOBS)
        self.zh_fraction = zh_fraction if self.cjk_fonts else 0.0
        if not self.latin_fonts and not self.cjk_fonts:
            raise RuntimeError("no TrueType fonts found; install fonts-dejavu-core (and fonts-wqy-microhei for Chinese)")
        if not self.cjk_fonts and zh_fraction > 0:
            warnings.warn("no CJK font found (install fonts-wqy-microhei): rendering English text only", stacklevel=2)

    # ------------------------------------------------------------------------------------------ text
    def _text(self, rng: random.Random, language: str, layout: str) -> str:
        if language == "zh":
            n = {"paragraph": 3, "poster": 2}.get(layout, 1)
            return "".join(rng.choice(ZH_PHRASES) for _ in range(n))
        n = {"label": 1, "button": rng.randint(1, 2), "paragraph": rng.randint(5, 8)}.get(layout, rng.randint(1, 3))
        words = [rng.choice(EN_WORDS) for _ in range(n)]
        style = rng.random()
        text = " ".join(words)
        if layout != "paragraph" and style < 0.5:
            return text.upper()
        return text.capitalize() if style < 0.8 else text

    # ----------------------------------------------------------------------------------- backgrounds
    def _background(self, rng: random.Random, size: tuple[int, int], kind: str, colour) -> Image.Image:
        w, h = size
        nrng = np.random.default_rng(rng.randrange(2**32))
        if kind == "solid":
            return Image.new("RGB", size, colour)
        if kind == "gradient":
            other = tuple(int(c) for c in nrng.integers(0, 256, 3))
            angle = rng.uniform(0, math.pi)
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            proj = xx * math.cos(angle) + yy * math.sin(angle)
            a = ((proj - proj.min()) / max(float(np.ptp(proj)), 1e-6))[..., None]
            arr = (1 - a) * np.array(colour, np.float32) + a * np.array(other, np.float32)
            return Image.fromarray(arr.astype(np.uint8))
        if kind == "noise":
            arr = np.array(colour, np.float32) + nrng.normal(0, 28, (h, w, 3))
            return Image.fromarray(arr.clip(0, 255).astype(np.uint8))
        # "texture": smooth multi-scale noise, photo-like blotches
        arr = np.zeros((h, w, 3), np.float32)
        for scale, amp in ((8, 60), (32, 30), (128, 12)):
            small = nrng.normal(0, 1, (max(2, h // scale), max(2, w // scale), 3))
            up = np.asarray(Image.fromarray(((small - small.min()) / (np.ptp(small) + 1e-6) * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC), np.float32)
            arr += (up - 128) / 128 * amp
        arr += np.array(colour, np.float32)
        return Image.fromarray(arr.clip(0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1))

    # ---------------------------------------------------------------------------------------- render
    def _font_path(self, rng: random.Random, language: str) -> str:
        pool = self.cjk_fonts if language == "zh" or not self.latin_fonts else self.latin_fonts
        return rng.choice(pool)

    @staticmethod
    def _wrap(draw, text: str, font, max_width: int, language: str) -> list[str]:
        units = list(text) if language == "zh" else text.split(" ")
        joiner = "" if language == "zh" else " "
        lines, line = [], ""
        for u in units:
            trial = u if not line else line + joiner + u
            if draw.textlength(trial, font=font) <= max_width or not line:
                line = trial
            else:
                lines.append(line)
                line = u
        if line:
            lines.append(line)
        return lines

    @classmethod
    def _place_text(cls, image: Image.Image, text: str, language: str, layout: str, font_path: str, fg_name: str,
                    bg_name: str, text_size: float, single_line: bool = False) -> tuple[str, str, int]:
        """Draw `text` in `layout` onto `image`, starting at `text_size` x the short side and shrinking until it
        fits (on one line when `single_line`). Returns the caption's (text colour, surface colour, font px)."""
        w, h = image.size
        draw = ImageDraw.Draw(image)
        fg = COLOURS[fg_name][0]
        margin = int(min(w, h) * 0.08)
        size = max(10, int(min(w, h) * text_size))
        font = ImageFont.truetype(font_path, size)
        lines = cls._wrap(draw, text, font, w - 2 * margin, language)
        while size > 10 and (len(lines) * size * 1.25 > h - 2 * margin or max(draw.textlength(line, font=font) for line in lines) > w - 2 * margin
                             or (single_line and len(lines) > 1)):
            size = int(size * 0.85)
            font = ImageFont.truetype(font_path, size)
            lines = cls._wrap(draw, text, font, w - 2 * margin, language)
        line_h = int(size * 1.25)
        block_h = line_h * len(lines)
        y = (h - block_h) // 2 if layout != "title_card" else margin
        if layout == "button":
            bw = max(draw.textlength(line, font=font) for line in lines) + 2 * size
            x0, y0 = (w - bw) / 2, (h - block_h) / 2 - size * 0.4
            draw.rounded_rectangle([x0, y0, x0 + bw, y0 + block_h + size * 0.8], radius=size // 2, fill=fg)
            # Text takes the background colour; the surface described in the caption is the button.
            fg_name, fg, bg_name = bg_name, COLOURS[bg_name][0], fg_name
        if layout == "label":
            draw.rectangle([margin // 2, margin // 2, w - margin // 2, h - margin // 2], outline=fg, width=max(2, size // 8))
        for line in lines:
            tw = draw.textlength(line, font=font)
            x = margin if layout == "paragraph" else (w - tw) / 2
            draw.text((x, y), line, font=font, fill=fg)
            y += line_h
        return fg_name, bg_name, size

    def render(self, index: int, aspect_ratio: float | None = None, language: str | None = None, text: str | None = None) -> RenderedSample:
        rng = random.Random(f"{self.seed}-{index}")
        lang_draw = rng.random()  # always drawn, so forcing the language keeps the rest of the layout
        language = language or ("zh" if lang_draw < self.zh_fraction else "en")
        layout = rng.choice(LAYOUTS)
        background = rng.choice(BACKGROUNDS)
        ar = aspect_ratio or rng.choice(ASPECT_RATIOS)
        w = int(round(self.base_size * math.sqrt(ar)))
        h = int(round(self.base_size / math.sqrt(ar)))
        bg_name = rng.choice(sorted(COLOURS))
        bg = COLOURS[bg_name][0]
        drawn = self._text(rng, language, layout)  # always drawn, so a given text keeps the same layout
        text = text if text is not None else drawn
        image = self._background(rng, (w, h), background, bg)
        # Text colour: the named colour with the best contrast against the background.
        fg_name = max(sorted(COLOURS), key=lambda n: sum(abs(a - b) for a, b in zip(COLOURS[n][0], bg)) + rng.random() * 60)
        font_path = self._font_path(rng, language)
        fg_name, bg_name, _ = self._place_text(image, text, language, layout, font_path, fg_name, bg_name, LAYOUT_TEXT_SIZE[layout])
        caption = self.caption(rng, text, language, layout, background, fg_name, bg_name)
        return RenderedSample(image, caption, text, language, layout, background, {"index": index, "font": font_path, "aspect_ratio": w / h})

    def render_spec(self, spec: RenderSpec) -> RenderedSample:
        """Render exactly what `spec` says (the text task's samples); its seed only drives background noise
        and the caption's wording, so two specs that differ in one field differ only there."""
        rng = random.Random(spec.seed)
        image = self._background(rng, spec.size, spec.background, COLOURS[spec.bg][0])
        fg_name, bg_name, font_px = self._place_text(image, spec.text, spec.language, spec.layout, spec.font, spec.fg, spec.bg,
                                                     spec.text_size, single_line=True)
        caption = self.caption(rng, spec.text, spec.language, spec.layout, spec.background, fg_name, bg_name)
        return RenderedSample(image, caption, spec.text, spec.language, spec.layout, spec.background,
                              {"font": spec.font, "font_px": font_px, "aspect_ratio": spec.size[0] / spec.size[1], "fg": fg_name, "bg": bg_name})

    @staticmethod
    def corrupt(text: str, seed: int) -> str:
        """A plausible misspelling: swap, drop or replace characters (the DPO loser's text)."""
        rng = random.Random(seed)
        chars = list(text)
        idx = [i for i, c in enumerate(chars) if not c.isspace()]
        for _ in range(max(1, len(idx) // 3)):
            i = rng.choice(idx)
            op = rng.random()
            if op < 0.4 and i + 1 < len(chars):
                chars[i], chars[i + 1] = chars[i + 1], chars[i]
            elif op < 0.7 and len(idx) > 2:
                chars[i] = ""
            else:
                pool = "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if chars[i].isupper() else ("abcdefghijklmnopqrstuvwxyz" if chars[i].isascii() else "口日月田目工王土")
                chars[i] = rng.choice(pool)
        out = "".join(chars)
        return out if out != text else text[::-1] if len(text) > 1 else text + text

    @staticmethod
    def caption(rng: random.Random, text: str, language: str, layout: str, background: str, fg: str, bg: str) -> str:
        """A caption that quotes the rendered text exactly (EN template, or ZH template for ZH text)."""
        if language == "zh":
            return f'一张{LAYOUT_NAMES_ZH[layout]}，{COLOURS[bg][1]}背景上用{COLOURS[fg][1]}文字写着"{text}"'
        verb = rng.choice(["with the text", "that says", "reading"])
        return f'{LAYOUT_NAMES_EN[layout]} {verb} "{text}" in {fg} letters on {background_phrase(background, bg)} background'


def background_phrase(background: str, colour: str) -> str:
    """How a caption names a background kind in a colour ("a plain red", "a red gradient", ...)."""
    return {"solid": f"a plain {colour}", "gradient": f"a {colour} gradient", "noise": f"a grainy {colour}",
            "texture": f"a textured {colour}"}[background]
