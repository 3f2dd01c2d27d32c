"""OCR scorer for English and Chinese with PP-OCRv4 (detection + recognition ONNX models shipped inside
the `rapidocr-onnxruntime` wheel: offline, CPU or GPU; see benchmarks/results_ocr.md for why not Tesseract).

The wheel's only recogniser is the bilingual (Chinese) one, which often lets the CTC blank win over the space
between small English words ("MARKETLIGHT"). CVTG-2K scores whitespace-split words with an English
recogniser, so we decode spaces back: between two non-CJK characters, a space is inserted when the space
class reaches `space_threshold` probability in any frame of the gap (measured: 0.09-0.48 at real word gaps,
<= 0.002 inside words; 0.02 lifts strict word accuracy on 256-px renders from 0.67 to 0.96 and leaves 384-px
renders unchanged). This fixes the reading, so the metrics stay the benchmarks' own, with no substring credit.

One OCR read per image gives every text metric (`measure`): the CVTG-2K word counts (word accuracy, per-word
NED), the LongText-Bench unit matches and the GRPO reward, all from `lit_ovis.scoring.metrics`, against
`metadata["target_text"]`. `score` returns the metric chosen by `metric` (default: the GRPO reward)."""

from __future__ import annotations

import numpy as np
import torch

from lit_ovis.scoring.base import Scorer, register, to_pil
from lit_ovis.scoring.metrics import language_of, ocr_reward, text_match, word_scores

METRICS = ("reward", "word_accuracy", "ned", "text_accuracy")


def _is_cjk(c: str) -> bool:
    return "\u4e00" <= c <= "\u9fff"


class SpaceRecoveringDecode:
    """Greedy CTC decoding (as rapidocr's) that also emits the word spaces the argmax drops (see module doc)."""

    def __init__(self, inner, threshold: float):
        self.inner, self.threshold = inner, threshold
        self.character = inner.character
        if self.character[-1] != " ":
            raise ValueError("expected rapidocr's CTC dictionary to end with the space class")

    def __call__(self, preds: np.ndarray, return_word_box: bool = False, **kwargs):
        if return_word_box:
            return self.inner(preds, return_word_box, **kwargs)
        idx, prob, space = preds.argmax(axis=2), preds.max(axis=2), preds[:, :, -1]
        out = []
        for b in range(preds.shape[0]):
            keep = idx[b] != 0
            keep[1:] &= idx[b][1:] != idx[b][:-1]
            cols = np.nonzero(keep)[0]
            text = ""
            for j, t in enumerate(cols):
                c = self.character[idx[b, t]]
                if j and c != " " and text and text[-1] != " " and not _is_cjk(c) and not _is_cjk(text[-1]):
                    gap = space[b, cols[j - 1] + 1: t]
                    if gap.size and gap.max() >= self.threshold:
                        text += " "
                text += c
            out.append((text, float(prob[b, cols].mean()) if len(cols) else 0.0))
        return out


def reading_order(result) -> str:
    """Join detected lines top-to-bottom, left-to-right."""
    if not result:
        return ""
    boxes = sorted(result, key=lambda r: (round(min(p[1] for p in r[0]) / 10), min(p[0] for p in r[0])))
    return " ".join(r[1] for r in boxes)


def text_metrics(text: str, target: str, language: str | None = None) -> dict:
    """Every OCR metric of one image from its recognised text (JSON-serialisable)."""
    language = language or language_of(target)
    ws = word_scores(text, target, language)
    matched, total = text_match(text, target, language)
    return {
        "ocr_text": text, "word_total": ws.total, "word_correct": ws.correct, "word_ned": ws.ned,
        "word_accuracy": ws.accuracy, "ned": ws.mean_ned,
        "text_matched": matched, "text_total": total, "text_accuracy": matched / total if total else 1.0,
        "reward": ocr_reward(text, target, language),
    }


@register("ocr")
class OCRScorer(Scorer):
    def __init__(self, batch_size: int = 8, device: str = "cpu", min_confidence: float = 0.3, metric: str = "reward",
                 space_threshold: float | None = 0.02):
        super().__init__(batch_size, device)
        if metric not in METRICS:
            raise ValueError(f"OCRScorer.metric must be one of {METRICS}, got {metric!r}")
        from rapidocr_onnxruntime import RapidOCR

        self.engine = RapidOCR()
        if space_threshold is not None:  # None: rapidocr's plain decoding
            rec = self.engine.text_rec
            rec.postprocess_op = SpaceRecoveringDecode(rec.postprocess_op, space_threshold)
        self.min_confidence = min_confidence
        self.metric = metric

    def read(self, images) -> list[str]:
        texts = []
        for im in to_pil(images):
            result, _ = self.engine(np.asarray(im))
            result = [r for r in (result or []) if r[2] >= self.min_confidence]
            texts.append(reading_order(result))
        return texts

    def measure(self, images, metadata) -> list[dict]:
        """One OCR read per image -> all metrics against each sample's target text."""
        return [text_metrics(t, m.get("target_text", ""), m.get("language")) for t, m in zip(self.read(images), metadata)]

    def _score_batch_with_details(self, images, prompts, metadata):
        details = self.measure(images, metadata)
        return torch.tensor([d[self.metric] for d in details], dtype=torch.float32), details
