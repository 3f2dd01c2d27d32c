"""Text-rendering metrics as pure functions.

- Word accuracy (CVTG-2K): the fraction of target words that appear in the OCR output, each OCR word
  usable once (a word glued to its neighbour by a dropped space still counts); for Chinese
  (LongText-Bench ZH) every character counts as a word.
- NED: normalised edit-distance *similarity*, 1 - Levenshtein(ocr, target) / max(len(ocr), len(target)),
  on normalised text (higher is better, as the benchmarks report it).
- OCR reward for GRPO (Flow-GRPO): 1 - min(1, Levenshtein(ocr, target) / len(target)), in [0, 1].
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)


def is_cjk(ch: str) -> bool:
    return "\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf"


def language_of(text: str) -> str:
    return "zh" if any(is_cjk(c) for c in text) else "en"


def normalize(text: str, language: str | None = None) -> str:
    """NFKC (full-width -> ASCII), lower case, punctuation removed, whitespace collapsed; no spaces for ZH."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _PUNCT.sub(" ", text)
    text = " ".join(text.split())
    if (language or language_of(text)) == "zh":
        text = text.replace(" ", "")
    return text


def tokens(text: str, language: str | None = None) -> list[str]:
    language = language or language_of(text)
    norm = normalize(text, language)
    return [c for c in norm if not c.isspace()] if language == "zh" else norm.split()


def levenshtein(a: str | list, b: str | list) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ned(prediction: str, target: str, language: str | None = None) -> float:
    language = language or language_of(target)
    p, t = normalize(prediction, language), normalize(target, language)
    if not p and not t:
        return 1.0
    return 1.0 - levenshtein(p, t) / max(len(p), len(t))


def word_accuracy(prediction: str, target: str, language: str | None = None) -> float:
    language = language or language_of(target)
    want = tokens(target, language)
    if not want:
        return 1.0
    have = Counter(tokens(prediction, language))
    hits, missed = 0, []
    for w in want:
        if have[w] > 0:
            have[w] -= 1
            hits += 1
        else:
            missed.append(w)
    # OCR often drops the space between adjacent words ("BANKCONCERT"): match the remaining target
    # words inside the leftover OCR text, each character usable once.
    leftover = "".join(w * n for w, n in have.items() if n > 0)
    for w in missed:
        if w in leftover:
            leftover = leftover.replace(w, "\0", 1)
            hits += 1
    return hits / len(want)


def ocr_reward(prediction: str, target: str, language: str | None = None) -> float:
    language = language or language_of(target)
    p, t = normalize(prediction, language), normalize(target, language)
    if not t:
        return 1.0 if not p else 0.0
    return 1.0 - min(1.0, levenshtein(p, t) / len(t))
