"""OCR scorer for English and Chinese with PP-OCRv4 (detection + recognition ONNX models shipped inside
the `rapidocr-onnxruntime` wheel: offline, CPU or GPU). The reward is the Flow-GRPO OCR reward against
`metadata["target_text"]`; `read()` exposes the recognised text for metrics and galleries."""

from __future__ import annotations

import numpy as np
import torch

from lit_ovis.scoring.base import Scorer, register, to_pil
from lit_ovis.scoring.metrics import ned, ocr_reward, word_accuracy


def reading_order(result) -> str:
    """Join detected lines top-to-bottom, left-to-right."""
    if not result:
        return ""
    boxes = sorted(result, key=lambda r: (round(min(p[1] for p in r[0]) / 10), min(p[0] for p in r[0])))
    return " ".join(r[1] for r in boxes)


@register("ocr")
class OCRScorer(Scorer):
    def __init__(self, batch_size: int = 8, device: str = "cpu", min_confidence: float = 0.3, metric: str = "reward"):
        super().__init__(batch_size, device)
        from rapidocr_onnxruntime import RapidOCR

        self.engine = RapidOCR()
        self.min_confidence = min_confidence
        if metric not in ("reward", "ned", "word_accuracy"):
            raise ValueError("OCRScorer.metric must be 'reward', 'ned' or 'word_accuracy'")
        self.metric = {"reward": ocr_reward, "ned": ned, "word_accuracy": word_accuracy}[metric]

    def read(self, images) -> list[str]:
        texts = []
        for im in to_pil(images):
            result, _ = self.engine(np.asarray(im))
            result = [r for r in (result or []) if r[2] >= self.min_confidence]
            texts.append(reading_order(result))
        return texts

    def _score_batch(self, images, prompts, metadata):
        texts = self.read(images)
        return torch.tensor([self.metric(t, m.get("target_text", ""), m.get("language")) for t, m in zip(texts, metadata)])
