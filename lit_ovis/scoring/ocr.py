"""OCR scorer for English and Chinese with PP-OCRv4 (detection + recognition ONNX models shipped inside
the `rapidocr-onnxruntime` wheel: offline, CPU or GPU; see benchmarks/results_ocr.md for why not Tesseract).

The wheel's only recogniser is the bilingual (Chinese) one, which often lets the CTC blank win over the space
between small English words ("MARKETLIGHT"). CVTG-2K scores whitespace-split words with an English
recogniser, so we decode spaces back: between two non-CJK characters, a space is inserted when the space
class reaches `space_threshold` probability in any frame of the gap (measured: 0.09-0.48 at real word gaps,
<= 0.002 inside words; 0.02 lifts strict word accuracy on 256-px renders from 0.67 to 0.96 and leaves 384-px
renders unchanged). This fixes the reading, so the metrics stay the benchmarks' own, with no substring credit.

Two reading paths (`mode`): "detect" runs PP-OCR's text detector, then recognises every detected line (any
layout: multi-line, several regions, large images); "recognize" skips detection and recognises each whole
image as one text line, many images per ONNX call. On small single-line images (the CPU-scale word task,
GRPO rollouts) the second is the fast reward path; `benchmarks/bench_ocr.py --word-task` measures both side by
side. Recognition crops each image to its text band first (rows and columns that differ from the border
colour), so a word in the middle of a square image reaches the recogniser at its input height, not shrunk.

One OCR read per image gives every text metric (`measure`): the CVTG-2K word counts (word accuracy, per-word
NED), the LongText-Bench unit matches and the GRPO reward, all from `lit_ovis.scoring.metrics`, against
`metadata["target_text"]`. `score` returns the metric chosen by `metric` (default: the GRPO reward)."""

from __future__ import annotations

import numpy as np
import torch

from lit_ovis.scoring.base import Scorer, register, to_pil
from lit_ovis.scoring.metrics import language_of, ocr_reward, text_match, word_scores

METRICS = ("reward", "word_accuracy", "ned", "text_accuracy")
MODES = ("detect", "recognize")


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


def text_band(image: np.ndarray, threshold: float = 40.0, pad: float = 0.15) -> np.ndarray:
    """Crop an RGB image [H, W, 3] to the rows and columns whose pixels differ from the border's median
    colour by more than `threshold` (sum over channels), padded by `pad` x the band height; the whole
    image when nothing stands out (or everything does, e.g. a busy background)."""
    arr = image.astype(np.int16)
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    diff = np.abs(arr - np.median(border, axis=0)).sum(-1) > threshold
    rows, cols = np.nonzero(diff.any(1))[0], np.nonzero(diff.any(0))[0]
    if not len(rows) or diff.mean() > 0.6:
        return image
    p = int(round(pad * (rows[-1] - rows[0] + 1))) + 2
    r0, r1 = max(rows[0] - p, 0), min(rows[-1] + p + 1, arr.shape[0])
    c0, c1 = max(cols[0] - p, 0), min(cols[-1] + p + 1, arr.shape[1])
    return image[r0:r1, c0:c1]


@register("ocr")
class OCRScorer(Scorer):
    def __init__(self, batch_size: int = 8, device: str = "cpu", min_confidence: float = 0.3, metric: str = "reward",
                 space_threshold: float | None = 0.02, mode: str = "detect"):
        super().__init__(batch_size, device)
        if metric not in METRICS:
            raise ValueError(f"OCRScorer.metric must be one of {METRICS}, got {metric!r}")
        if mode not in MODES:
            raise ValueError(f"OCRScorer.mode must be one of {MODES}, got {mode!r}")
        from rapidocr_onnxruntime import RapidOCR

        self.engine = RapidOCR()
        rec = self.engine.text_rec
        if space_threshold is not None:  # None: rapidocr's plain decoding
            rec.postprocess_op = SpaceRecoveringDecode(rec.postprocess_op, space_threshold)
        if mode == "recognize":  # one ONNX call per scorer batch instead of rapidocr's batches of 6
            rec.rec_batch_num = max(batch_size, 1)
        self.min_confidence = min_confidence
        self.metric = metric
        self.mode = mode

    def read(self, images) -> list[str]:
        pil = to_pil(images)
        if self.mode == "recognize":
            return self.recognize([np.asarray(im) for im in pil])
        texts = []
        for im in pil:
            result, _ = self.engine(np.asarray(im))
            result = [r for r in (result or []) if r[2] >= self.min_confidence]
            texts.append(reading_order(result))
        return texts

    def recognize(self, arrays: list[np.ndarray]) -> list[str]:
        """Each image as one text line: crop to its text band, recognise in batches (no detection)."""
        crops = [np.ascontiguousarray(text_band(a)) for a in arrays]
        results, _ = self.engine.text_rec(crops)
        return [text if score >= self.min_confidence else "" for text, score in results]

    def measure(self, images, metadata) -> list[dict]:
        """One OCR read per image -> all metrics against each sample's target text."""
        return [text_metrics(t, m.get("target_text", ""), m.get("language")) for t, m in zip(self.read(images), metadata)]

    def _score_batch_with_details(self, images, prompts, metadata):
        details = self.measure(images, metadata)
        return torch.tensor([d[self.metric] for d in details], dtype=torch.float32), details
