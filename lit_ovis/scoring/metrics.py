"""Text-rendering metrics as pure functions, following the public evaluation scripts of the benchmarks the
Ovis-Image report cites (definitions re-implemented here, not copied).

CVTG-2K (Du et al. 2025, TextCrafter; `unified_metrics_eval.py` of the TextCrafter evaluation tool):
- target words: every single-quoted span of the prompt, lower-cased and split on whitespace (punctuation kept);
- OCR words: every recognised line, lower-cased and split on whitespace ([""] when nothing was read);
- a target word is *correct* when it occurs among the OCR words (membership, so a word counted once in the
  OCR output can satisfy a repeated target word);
- the per-word NED similarity is 1 - lev(word, best) / (max(len) + 1e-5), where `best` is the OCR word that
  `difflib.get_close_matches(word, ocr_words, n=1, cutoff=0)` picks;
- Word Accuracy = correct words / target words and NED = mean per-word similarity, both *pooled over every
  target word of the set* (not averaged per image), reported overall and per region count (2-5).
CVTG-2K is English-only; for Chinese targets we use characters as the words (as LongText-Bench ZH does).

LongText-Bench (Geng et al. 2025, X-Omni; `textbench/summary_scores.py`):
- text = the target texts joined by spaces; both sides keep only CJK, ASCII letters/digits, whitespace and
  accented Latin letters; EN collapses whitespace and lower-cases, ZH drops everything else incl. spaces;
- EN compares the multisets of words, ZH the multisets of characters; text accuracy = matched / target units,
  pooled over the set (sum of matches / sum of target units).

GRPO OCR reward (ours, built from the CVTG per-word similarity, in [0, 1]): the F1 of
recall = mean over target words of their best-match similarity and precision = mean over OCR words of their
best-match similarity to the target words. Recall alone could be gamed by rendering many extra words (every
extra word can only raise a best match); precision charges for them.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

# CVTG-2K: the text to render is quoted in single quotes inside the prompt.
_CVTG_QUOTED = re.compile(r"'(.*?)'")
# LongText-Bench keeps CJK unified ideographs, ASCII alphanumerics, whitespace and these accented letters.
_ACCENTED = "àâäéèêëîïôöùûüçÀÂÄÉÈÊËÎÏÔÖÙÛÜÇ"
_LONGTEXT_DROP = re.compile(rf"[^\u4e00-\u9fa5a-zA-Z0-9\s{_ACCENTED}]")
_LONGTEXT_ZH_KEEP = re.compile(rf"[\u4e00-\u9fa5a-zA-Z0-9{_ACCENTED}]")
NED_EPS = 1e-5  # CVTG-2K's denominator guard


def is_cjk(ch: str) -> bool:
    return "\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf"


def language_of(text: str) -> str:
    return "zh" if any(is_cjk(c) for c in text) else "en"


def quoted_spans(prompt: str) -> list[str]:
    """CVTG-2K target texts: the single-quoted spans of a prompt."""
    return _CVTG_QUOTED.findall(prompt)


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


def similarity(a: str, b: str) -> float:
    """CVTG-2K's normalised edit-distance similarity of two words."""
    return 1.0 - levenshtein(a, b) / (max(len(a), len(b)) + NED_EPS)


def longtext_normalize(text: str, language: str) -> str:
    """LongText-Bench preprocessing of OCR output and target text."""
    if language == "zh":
        return "".join(_LONGTEXT_ZH_KEEP.findall(text))
    return " ".join(_LONGTEXT_DROP.sub("", text).split()).lower()


def word_units(text: str, language: str | None = None) -> list[str]:
    """CVTG-2K words (EN: lower-cased whitespace split) or characters (ZH, LongText-Bench ZH normalisation)."""
    language = language or language_of(text)
    if language == "zh":
        return list(longtext_normalize(text, "zh"))
    return text.lower().split()


def _best_match(word: str, candidates: list[str]) -> str | None:
    match = difflib.get_close_matches(word, candidates, n=1, cutoff=0)
    return match[0] if match else None


@dataclass
class WordScores:
    """CVTG-2K per-image counts; pool them over a set with `pool_words`."""

    total: int = 0
    correct: int = 0
    ned: list[float] = field(default_factory=list)  # one similarity per target word

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 1.0

    @property
    def mean_ned(self) -> float:
        return sum(self.ned) / len(self.ned) if self.ned else 1.0


def word_scores(prediction: str, target: str, language: str | None = None) -> WordScores:
    """CVTG-2K word counts for one image: `prediction` is the OCR text (lines joined by spaces), `target` the
    text to render (several regions joined by spaces)."""
    language = language or language_of(target)
    want = word_units(target, language)
    have = word_units(prediction, language) or [""]
    present = set(have)
    sims = []
    for w in want:
        best = _best_match(w, have)
        sims.append(similarity(w, best) if best is not None else 0.0)
    return WordScores(total=len(want), correct=sum(w in present for w in want), ned=sims)


def word_accuracy(prediction: str, target: str, language: str | None = None) -> float:
    """CVTG-2K word accuracy of one image (pooled over a set by `pool_words`)."""
    return word_scores(prediction, target, language).accuracy


def ned(prediction: str, target: str, language: str | None = None) -> float:
    """CVTG-2K NED (mean per-target-word similarity) of one image."""
    return word_scores(prediction, target, language).mean_ned


def pool_words(scores: list[WordScores]) -> dict[str, float | int]:
    """Set-level CVTG-2K metrics: every target word of every image weighs the same."""
    total = sum(s.total for s in scores)
    sims = [v for s in scores for v in s.ned]
    return {"word_accuracy": sum(s.correct for s in scores) / total if total else None,
            "ned": sum(sims) / len(sims) if sims else None, "words": total}


def word_accuracy_interval(scores: list[WordScores], level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the pooled word accuracy, resampling images (the words of one image are
    not independent, e.g. the characters of a Chinese word), so two runs can be compared on the same prompts."""
    import random

    scores = [s for s in scores if s.total]
    if not scores:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    stats = []
    for _ in range(resamples):
        pick = [scores[rng.randrange(len(scores))] for _ in scores]
        stats.append(sum(s.correct for s in pick) / sum(s.total for s in pick))
    stats.sort()
    tail = (1 - level) / 2
    return stats[int(tail * (resamples - 1))], stats[int(round((1 - tail) * (resamples - 1)))]


def text_match(prediction: str, target: str, language: str | None = None) -> tuple[int, int]:
    """LongText-Bench (matched units, target units) for one image: words (EN) or characters (ZH)."""
    language = language or language_of(target)
    p, t = longtext_normalize(prediction, language), longtext_normalize(target, language)
    want = Counter(t.split() if language == "en" else t)
    have = Counter(p.split() if language == "en" else p)
    return sum((want & have).values()), sum(want.values())


def text_accuracy(prediction: str, target: str, language: str | None = None) -> float:
    matched, total = text_match(prediction, target, language)
    return matched / total if total else 1.0


def ocr_reward(prediction: str, target: str, language: str | None = None) -> float:
    """GRPO reward in [0, 1]: F1 of CVTG per-word similarity recall (target side) and precision (OCR side)."""
    language = language or language_of(target)
    want, have = word_units(target, language), word_units(prediction, language)
    if not want:
        return 1.0 if not have else 0.0
    if not have:
        return 0.0
    recall = sum(similarity(w, _best_match(w, have)) for w in want) / len(want)
    precision = sum(similarity(h, _best_match(h, want)) for h in have) / len(have)
    return 0.0 if recall + precision <= 0 else 2 * recall * precision / (recall + precision)


# ----------------------------------------------------------------------------------- set-level aggregation
def group_metrics(records: list[dict], names: list[str]) -> dict:
    """Means of each scorer and the pooled OCR metrics of a set of scored records (eval's per-sample records:
    {"scores": {name: value}, "ocr": `ocr.text_metrics` output or None, ...})."""
    entry: dict[str, Any] = {"samples": len(records)}
    for name in names:
        values = [r["scores"][name] for r in records if name in r["scores"]]
        entry[name] = sum(values) / len(values) if values else None
    with_text = [r for r in records if r.get("ocr") and r["ocr"]["word_total"] > 0]
    if with_text:
        # Pooled over every target word / unit of the group, as CVTG-2K and LongText-Bench aggregate.
        entry.update(pool_words([WordScores(r["ocr"]["word_total"], r["ocr"]["word_correct"], r["ocr"]["word_ned"]) for r in with_text]))
        units = sum(r["ocr"]["text_total"] for r in with_text)
        entry["text_accuracy"] = sum(r["ocr"]["text_matched"] for r in with_text) / units if units else None
        entry["text_units"] = units
        entry["ocr_reward"] = sum(r["ocr"]["reward"] for r in with_text) / len(with_text)
    return entry


def aggregate(records: list[dict], names: list[str] | None = None) -> dict:
    """Set-level metrics overall and per language (EN / ZH), plus CVTG-2K's breakdown by region count: what
    `lit-ovis eval` reports and the in-training eval callback logs."""
    names = names if names is not None else (list(records[0]["scores"]) if records else [])
    agg: dict[str, Any] = {"samples": len(records)}
    for lang in ("all", "en", "zh"):
        subset = [r for r in records if lang == "all" or r["language"] == lang]
        if subset:
            agg[lang] = group_metrics(subset, names)
    regions = sorted({r["regions"] for r in records if r.get("benchmark") == "cvtg" and r.get("regions")})
    if regions:  # CVTG-2K's breakdown by the number of text regions in the prompt
        agg["cvtg_by_regions"] = {str(n): group_metrics([r for r in records if r.get("regions") == n], names) for n in regions}
    return agg


def word_accuracy_gain_interval(before: list[WordScores], after: list[WordScores], level: float = 0.95,
                                resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(gain, low, high): pooled word accuracy of `after` minus `before` on the same images (paired: entry i of
    both lists scores the same prompt and seed), with a percentile-bootstrap interval resampling images. A gain
    is significant at `level` when `low > 0`."""
    import random

    if len(before) != len(after):
        raise ValueError(f"paired scores need the same images ({len(before)} vs {len(after)})")
    pairs = [(b, a) for b, a in zip(before, after) if b.total and a.total]
    if not pairs:
        return float("nan"), float("nan"), float("nan")

    def gain(sample):
        return (sum(a.correct for _, a in sample) / sum(a.total for _, a in sample)
                - sum(b.correct for b, _ in sample) / sum(b.total for b, _ in sample))

    rng = random.Random(seed)
    stats = sorted(gain([pairs[rng.randrange(len(pairs))] for _ in pairs]) for _ in range(resamples))
    tail = (1 - level) / 2
    return gain(pairs), stats[int(tail * (resamples - 1))], stats[int(round((1 - tail) * (resamples - 1)))]
