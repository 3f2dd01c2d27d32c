"""A small text-rendering task for CPU-scale runs: one short word per image, held-out evaluation splits.

Samples are single-line renders of the synthetic engine (`TextRenderingEngine.render_spec`): an upper-case
English word or a two-character Chinese word, large on a solid or gradient background, in one of the
single-line layouts, in a small image whose size is one of prepare's aspect-ratio buckets (so `lit-ovis
prepare` keeps every pixel). Captions are the engine's and quote the text exactly.

Splits (every word of a split appears equally often):
- `train`: the training vocabulary;
- `heldout`: the training vocabulary rendered with other seeds; every held-out sample's combination of
  (text, layout, background, colours, size) is absent from `train` (the split the stage ladder targets);
- `unseen`: words outside the training vocabulary (reported, not targeted).

The vocabulary size (`en_words`, `zh_words`) is the task's difficulty knob. `build_word_task` writes the
splits as PNGs plus one JSONL per split that is both a `lit-ovis prepare` / `make-pairs` manifest (path,
caption, language, target_text) and a prompt set for `lit-ovis eval` and `data_modules.prompts` (caption as
prompt, target_text, width/height of the sample's bucket). The folder is cached under a fingerprint of the
settings and swapped in atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from data_modules.buckets import assign_bucket, make_buckets
from data_modules.layout import read_json, swap_in
from data_modules.synthetic.engine import (LAYOUT_NAMES_EN, LAYOUT_NAMES_ZH, LAYOUTS, RenderedSample, RenderSpec, TextRenderingEngine,
                                           background_phrase)
from data_modules.synthetic.vocab import COLOURS, EN_WORDS, ZH_PHRASES
from lit_ovis.errors import ConfigError
from lit_ovis.files import atomic_write_json

SPLITS = ("train", "heldout", "unseen")
CAPTION_STYLES = ("engine", "word_first")
TASK_FILE = "task.json"
FORMAT = 1  # bump when the rendering of a given config changes
# Settings added after FORMAT 1 and the value that behaves as before: they enter the fingerprint only when set
# otherwise, so folders built before they existed (same renders, same captions) stay valid instead of being
# re-rendered, which would also retrain the autoencoder and re-encode the latents kept beside them.
LATER_SETTINGS = {"caption_style": "engine", "colours": ()}
SINGLE_LINE_LAYOUTS = tuple(layout for layout in LAYOUTS if layout != "paragraph")
FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/truetype/wqy", "/usr/share/fonts/opentype/noto")


@dataclass
class WordTaskConfig:
    en_words: int = 12
    """English words in the training vocabulary (upper case, 3-6 letters)."""
    zh_words: int = 6
    """Chinese two-character words in the training vocabulary."""
    unseen_en_words: int = 8
    """English words of the `unseen` split (never in the training vocabulary)."""
    unseen_zh_words: int = 4
    """Chinese words of the `unseen` split."""
    train_samples: int = 2048
    """Renders in the training split."""
    heldout_samples: int = 256
    """Renders in the held-out split (training vocabulary, new seeds/colours/layouts)."""
    unseen_samples: int = 128
    """Renders in the unseen-words split."""
    resolution: int = 96
    """Bucket target side as in `lit-ovis prepare --resolution` (image area ~ resolution^2)."""
    aspect_ratios: tuple[float, ...] = (1.0, 2.25, 4.0)
    """Width/height ratios; each picks prepare's closest bucket at `resolution`."""
    layouts: tuple[str, ...] = ("poster", "title_card", "label", "button")
    """Single-line engine layouts to draw from."""
    backgrounds: tuple[str, ...] = ("solid", "gradient")
    """Engine background kinds to draw from."""
    colours: tuple[str, ...] = ()
    """Colour names text and background are drawn from (empty: every engine colour). Fewer colours make an easier
    task, e.g. `black,white` for the demo."""
    latin_font: str = "DejaVuSans-Bold.ttf"
    """Font file (name or path) for English words."""
    cjk_font: str = "wqy-microhei.ttc"
    """Font file (name or path) for Chinese words."""
    text_size: float = 0.6
    """Starting text height as a fraction of the image's short side (shrunk until the word fits one line)."""
    min_font_px: int = 24
    """A sample's bucket is drawn among those where its word fits at this font size or larger."""
    min_contrast: float = 90.0
    """Minimum luminance difference (0-255) between text and background colour."""
    caption_style: str = "engine"
    """"engine": the engine's captions (the word quoted mid-sentence, e.g. 'A poster that says "SALE" in red letters
    on ...'); "word_first": the quoted word opens the caption ('"SALE" on a poster in red letters on ...'), so it sits
    at the same text positions in every prompt."""
    seed: int = 0
    """Seed of the renders (split seeds derive from it)."""
    vocab_seed: int = 0
    """Seed of the vocabulary choice."""

    def check(self) -> None:
        if self.en_words + self.zh_words < 1:
            raise ConfigError("--en-words + --zh-words must be >= 1 (the training vocabulary is empty)")
        if min(self.en_words, self.zh_words, self.unseen_en_words, self.unseen_zh_words) < 0:
            raise ConfigError("word counts must be >= 0")
        en, zh = candidate_words()
        if self.en_words + self.unseen_en_words > len(en) or self.zh_words + self.unseen_zh_words > len(zh):
            raise ConfigError(f"at most {len(en)} English and {len(zh)} Chinese words exist (training + unseen); "
                              f"got {self.en_words}+{self.unseen_en_words} and {self.zh_words}+{self.unseen_zh_words}")
        if self.resolution < 16 or self.resolution % 16:
            raise ConfigError(f"--resolution must be a positive multiple of 16 (got {self.resolution})")
        bad = [layout for layout in self.layouts if layout not in SINGLE_LINE_LAYOUTS]
        if bad or not self.layouts:
            raise ConfigError(f"--layouts {bad or '[]'}: choose from {list(SINGLE_LINE_LAYOUTS)}")
        if not self.backgrounds or any(b not in ("solid", "gradient", "noise", "texture") for b in self.backgrounds):
            raise ConfigError(f"--backgrounds {list(self.backgrounds)}: choose from solid, gradient, noise, texture")
        unknown = [c for c in self.colours if c not in COLOURS]
        if unknown or len(set(self.colours)) == 1:
            raise ConfigError(f"--colours {list(self.colours)}: give two or more of {sorted(COLOURS)} (or none for all)")
        if self.caption_style not in CAPTION_STYLES:
            raise ConfigError(f"--caption-style {self.caption_style!r}: choose one of {list(CAPTION_STYLES)}")
        if not self.aspect_ratios or any(a <= 0 for a in self.aspect_ratios):
            raise ConfigError(f"--aspect-ratios must be positive numbers (got {list(self.aspect_ratios)})")

    def fingerprint(self) -> str:
        settings = {k: v for k, v in asdict(self).items()  # json.dumps: a list read back from task.json equals the tuple
                    if k not in LATER_SETTINGS or json.dumps(v) != json.dumps(LATER_SETTINGS[k])}
        blob = json.dumps([FORMAT, settings], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Vocabulary:
    train: list[str] = field(default_factory=list)
    unseen: list[str] = field(default_factory=list)


def candidate_words() -> tuple[list[str], list[str]]:
    """(English, Chinese) words the task may use: 3-6 letter English words (upper case), 2-character Chinese."""
    en = sorted({w.upper() for w in EN_WORDS if 3 <= len(w) <= 6})
    zh = sorted({w for w in ZH_PHRASES if len(w) == 2})
    return en, zh


def vocabulary(cfg: WordTaskConfig) -> Vocabulary:
    """Training and unseen words: disjoint draws from the candidates, fixed by `vocab_seed`."""
    en, zh = candidate_words()
    rng = random.Random(f"vocab-{cfg.vocab_seed}")
    rng.shuffle(en)
    rng.shuffle(zh)
    return Vocabulary(
        train=en[: cfg.en_words] + zh[: cfg.zh_words],
        unseen=en[cfg.en_words: cfg.en_words + cfg.unseen_en_words] + zh[cfg.zh_words: cfg.zh_words + cfg.unseen_zh_words],
    )


def language_of_word(word: str) -> str:
    return "en" if word.isascii() else "zh"


def resolve_font(name: str) -> str:
    if os.path.isabs(name):
        if not os.path.exists(name):
            raise ConfigError(f"font {name} not found")
        return name
    for folder in FONT_DIRS:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return path
    raise ConfigError(f"font {name} not found in {list(FONT_DIRS)}; install fonts-dejavu-core and fonts-wqy-microhei "
                      "or pass a font file path")


def luminance(rgb) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


class WordTask:
    """Draws the specs of each split and renders them (deterministic per config)."""

    def __init__(self, cfg: WordTaskConfig):
        cfg.check()
        self.cfg = cfg
        self.vocab = vocabulary(cfg)
        self.fonts = {"en": resolve_font(cfg.latin_font), "zh": resolve_font(cfg.cjk_font)}
        self.engine = TextRenderingEngine(seed=cfg.seed, fonts_latin=[self.fonts["en"]], fonts_cjk=[self.fonts["zh"]])
        buckets = make_buckets(cfg.resolution)
        self.sizes = sorted({assign_bucket(round(1000 * a ** 0.5), round(1000 / a ** 0.5), buckets) for a in cfg.aspect_ratios})
        self._fitting: dict[str, list[tuple[int, int]]] = {}

    def fitting_sizes(self, word: str) -> list[tuple[int, int]]:
        """Sizes in which `word` fits on one line at `min_font_px` or larger (the widest size otherwise)."""
        if word not in self._fitting:
            from PIL import ImageFont

            font = ImageFont.truetype(self.fonts[language_of_word(word)], self.cfg.min_font_px)
            ok = []
            for w, h in self.sizes:
                margin = int(min(w, h) * 0.08)
                if font.getlength(word) <= w - 2 * margin and self.cfg.min_font_px * 1.25 <= h - 2 * margin:
                    ok.append((w, h))
            self._fitting[word] = ok or [max(self.sizes, key=lambda s: s[0] / s[1])]
        return self._fitting[word]

    def words(self, split: str) -> list[str]:
        return self.vocab.unseen if split == "unseen" else self.vocab.train

    def draw_spec(self, word: str, seed: str) -> RenderSpec:
        cfg = self.cfg
        rng = random.Random(seed)
        palette = sorted(cfg.colours or COLOURS)
        bg = rng.choice(palette)
        contrast = [n for n in palette if abs(luminance(COLOURS[n][0]) - luminance(COLOURS[bg][0])) >= cfg.min_contrast]
        fg = rng.choice(contrast or [max((n for n in palette if n != bg), key=lambda n: abs(luminance(COLOURS[n][0]) - luminance(COLOURS[bg][0])))])
        return RenderSpec(
            text=word, language=language_of_word(word), layout=rng.choice(list(cfg.layouts)),
            background=rng.choice(list(cfg.backgrounds)), bg=bg, fg=fg, size=rng.choice(self.fitting_sizes(word)),
            font=self.fonts[language_of_word(word)], text_size=cfg.text_size, seed=seed,
        )

    @staticmethod
    def combination(spec: RenderSpec) -> tuple:
        """What a held-out sample must not share, all together, with any training sample."""
        return spec.text, spec.layout, spec.background, spec.fg, spec.bg, spec.size

    def specs(self, split: str) -> list[RenderSpec]:
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
        n = {"train": self.cfg.train_samples, "heldout": self.cfg.heldout_samples, "unseen": self.cfg.unseen_samples}[split]
        words = self.words(split)
        if not words or n <= 0:
            return []
        seen = {self.combination(s) for s in self.specs("train")} if split == "heldout" else set()
        out = []
        for i in range(n):
            word = words[i % len(words)]
            attempt = 0
            while True:  # held-out: redraw until the combination is new (a handful of tries at most)
                spec = self.draw_spec(word, f"{self.cfg.seed}-{split}-{i}-{attempt}")
                if self.combination(spec) not in seen or attempt >= 100:
                    break
                attempt += 1
            out.append(spec)
        return out

    def samples(self, split: str) -> Iterator[tuple[RenderSpec, RenderedSample]]:
        for spec in self.specs(split):
            sample = self.engine.render_spec(spec)
            if self.cfg.caption_style == "word_first":
                sample = dataclasses.replace(sample, caption=word_first_caption(spec, sample.meta["fg"], sample.meta["bg"]))
            yield spec, sample


def word_first_caption(spec: RenderSpec, fg: str, bg: str) -> str:
    """The quoted word first, then what the engine's caption says about layout and colours."""
    if spec.language == "zh":
        return f'"{spec.text}"，{LAYOUT_NAMES_ZH[spec.layout]}，{COLOURS[bg][1]}背景上用{COLOURS[fg][1]}文字'
    kind = LAYOUT_NAMES_EN[spec.layout]
    return f'"{spec.text}" on {kind[0].lower()}{kind[1:]} in {fg} letters on {background_phrase(spec.background, bg)} background'


def record(spec: RenderSpec, sample: RenderedSample, split: str, index: int, path: str) -> dict:
    """One JSONL line: a prepare/make-pairs manifest row and an eval/GRPO prompt record at once."""
    w, h = spec.size
    return {"id": f"{split}-{index:06d}", "path": path, "caption": sample.caption, "prompt": sample.caption,
            "target_text": spec.text, "language": spec.language, "width": w, "height": h, "layout": spec.layout,
            "background": spec.background, "fg": sample.meta["fg"], "bg": sample.meta["bg"], "font_px": sample.meta["font_px"]}


def build_word_task(cfg: WordTaskConfig, output_dir: str | Path, progress: bool = True) -> dict:
    """Render every split into `output_dir` (images/<split>/*.png, <split>.jsonl, task.json); a no-op when the
    folder already holds this config's task. Returns the task report."""
    out = Path(output_dir)
    fingerprint = cfg.fingerprint()
    done = read_json(out / TASK_FILE)
    if done and done.get("fingerprint") == fingerprint and all((out / f"{s}.jsonl").exists() for s in SPLITS):
        return {**done, "rendered_this_run": 0}
    task = WordTask(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    counts, font_px = {}, {}
    for split in SPLITS:
        (tmp / "images" / split).mkdir(parents=True)
        lines, sizes = [], []
        for i, (spec, sample) in enumerate(task.samples(split)):
            rel = f"images/{split}/{i:06d}.png"
            sample.image.save(tmp / rel)
            row = record(spec, sample, split, i, rel)
            lines.append(json.dumps(row, ensure_ascii=False))
            sizes.append(sample.meta["font_px"])
        (tmp / f"{split}.jsonl").write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
        counts[split] = len(lines)
        font_px[split] = {"min": min(sizes), "mean": round(sum(sizes) / len(sizes), 1)} if sizes else None
        if progress:
            print(f"word-task: {split} {len(lines)} samples", flush=True)
    report = {
        "format": FORMAT, "fingerprint": fingerprint, "config": asdict(cfg), "counts": counts,
        "vocabulary": {"train": task.vocab.train, "unseen": task.vocab.unseen},
        "sizes": [list(s) for s in task.sizes], "font_px": font_px,
    }
    atomic_write_json(tmp / TASK_FILE, report)
    swap_in(tmp, out)
    return {**report, "rendered_this_run": sum(counts.values())}
