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
`metadata["target_text"]`. `score` returns the metric chosen by `metric` (default: the GRPO reward).

`metric="likelihood"` (recognize mode) is the dense alternative to the reading's reward: the recogniser's CTC
probability of the target text per character (`lit_ovis.scoring.ctc`), from the same ONNX call as the reading.
It still rises when a misread character gets sharper, so GRPO groups whose readings tie still rank."""

from __future__ import annotations

import numpy as np
import torch

from lit_ovis.scoring.base import Scorer, register, to_pil
from lit_ovis.scoring.ctc import label_columns, per_character_likelihood
from lit_ovis.scoring.metrics import language_of, ocr_reward, text_match, word_scores

METRICS = ("reward", "word_accuracy", "ned", "text_accuracy", "likelihood")
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
        if metric == "likelihood" and mode != "recognize":
            raise ValueError("OCRScorer.metric='likelihood' reads each image as one text line: set mode='recognize'")
        from rapidocr_onnxruntime import RapidOCR

        self.engine = RapidOCR()
        rec = self.engine.text_rec
        if space_threshold is not None:  # None: rapidocr's plain decoding
            rec.postprocess_op = SpaceRecoveringDecode(rec.postprocess_op, space_threshold)
        self.index = {c: i for i, c in enumerate(rec.postprocess_op.character) if i}  # 0 is the CTC blank
        self.min_confidence = min_confidence
        self.metric = metric
        self.mode = mode

    def read(self, images) -> list[str]:
        pil = to_pil(images)
        if self.mode == "recognize":
            return [text for text, _ in self.recognize([np.asarray(im) for im in pil])]
        texts = []
        for im in pil:
            result, _ = self.engine(np.asarray(im))
            result = [r for r in (result or []) if r[2] >= self.min_confidence]
            texts.append(reading_order(result))
        return texts

    def recognize(self, arrays: list[np.ndarray]) -> list[tuple[str, np.ndarray]]:
        """Each image as one text line: crop to its text band, recognise `batch_size` crops per ONNX call
        (sorted by width, as rapidocr batches, so little padding). Returns (reading, frame probabilities [T, C])."""
        rec = self.engine.text_rec
        crops = [np.ascontiguousarray(text_band(a)) for a in arrays]
        ratios = [c.shape[1] / c.shape[0] for c in crops]
        order = np.argsort(ratios, kind="stable")
        out: list[tuple[str, np.ndarray]] = [("", np.zeros((0, 0)))] * len(crops)
        _, height, width = rec.rec_image_shape[:3]
        per_call = max(self.batch_size, 1)
        for start in range(0, len(crops), per_call):
            chunk = order[start: start + per_call]
            widest = max([width / height] + [ratios[i] for i in chunk])
            batch = np.stack([rec.resize_norm_img(crops[i], widest) for i in chunk]).astype(np.float32)
            probs = rec.session(batch)[0]
            readings = rec.postprocess_op(probs, False, wh_ratio_list=[ratios[i] for i in chunk], max_wh_ratio=widest)
            for row, i in enumerate(chunk):
                text, confidence = readings[row][:2]
                out[i] = (text if confidence >= self.min_confidence else "", probs[row])
        return out

    def measure(self, images, metadata) -> list[dict]:
        """One OCR read per image -> all metrics against each sample's target text (and, in recognize mode,
        the recogniser's per-character likelihood of it)."""
        targets = [(m.get("target_text", ""), m.get("language")) for m in metadata]
        if self.mode == "detect":
            return [text_metrics(t, target, lang) for t, (target, lang) in zip(self.read(images), targets)]
        readings = self.recognize([np.asarray(im) for im in to_pil(images)])
        return [{**text_metrics(text, target, lang),
                 "likelihood": per_character_likelihood(probs, label_columns(target, self.index))}
                for (text, probs), (target, lang) in zip(readings, targets)]

    def _score_batch_with_details(self, images, prompts, metadata):
        details = self.measure(images, metadata)
        return torch.tensor([d[self.metric] for d in details], dtype=torch.float32), details
