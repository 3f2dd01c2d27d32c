"""Evaluation during training: every N steps, sample a small fixed prompt set through the stage module's
`sample()` and log OCR word accuracy / NED and scorer means (EN and ZH separately)."""

from __future__ import annotations

import lightning as L
import torch

from lit_ovis.scoring import build_scorer
from lit_ovis.scoring.metrics import ned, word_accuracy
from lit_ovis.scoring.prompt_sets import read_prompt_set

DEFAULT_SET = [
    {"prompt": 'A poster with the text "OPEN DAILY" in bold white letters', "target_text": "OPEN DAILY", "language": "en"},
    {"prompt": 'A shop sign that says "FRESH BREAD"', "target_text": "FRESH BREAD", "language": "en"},
    {"prompt": '一张写着"欢迎光临"的红色海报', "target_text": "欢迎光临", "language": "zh"},
    {"prompt": '标签上写着"咖啡"', "target_text": "咖啡", "language": "zh"},
]


class EvalCallback(L.Callback):
    def __init__(self, prompt_file: str | None = None, every_n_steps: int = 1000, scorers: list[str] | None = None, limit: int | None = 64,
                 seed: int = 0, batch_size: int = 4, steps: int | None = None, guidance_scale: float | None = None,
                 height: int | None = None, width: int | None = None):
        self.items = read_prompt_set(prompt_file, limit) if prompt_file else DEFAULT_SET
        self.every_n_steps = every_n_steps
        self.scorer_names = scorers if scorers is not None else ["ocr"]
        self._scorers = None
        self.seed, self.batch_size = seed, batch_size
        self.kwargs = dict(steps=steps, guidance_scale=guidance_scale, height=height, width=width)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0:
            self.run(trainer, pl_module)

    @torch.no_grad()
    def run(self, trainer, pl_module) -> dict[str, float]:
        if self._scorers is None:
            self._scorers = {name: build_scorer(name) for name in self.scorer_names}
        images = torch.cat([
            pl_module.sample([it["prompt"] for it in self.items[k : k + self.batch_size]], seed=self.seed + k, **self.kwargs).float().cpu()
            for k in range(0, len(self.items), self.batch_size)
        ])
        prompts = [it["prompt"] for it in self.items]
        meta = [{"target_text": it.get("target_text", ""), "language": it.get("language", "en")} for it in self.items]
        metrics: dict[str, float] = {}
        for name, scorer in self._scorers.items():
            metrics[f"eval/{name}"] = scorer.score(images, prompts, meta).mean().item()
        ocr = self._scorers.get("ocr")
        if ocr is not None:
            texts = ocr.read(images)
            for lang in ("en", "zh"):
                idx = [i for i, m in enumerate(meta) if m["language"] == lang and m["target_text"]]
                if idx:
                    metrics[f"eval/{lang}_word_accuracy"] = sum(word_accuracy(texts[i], meta[i]["target_text"], lang) for i in idx) / len(idx)
                    metrics[f"eval/{lang}_ned"] = sum(ned(texts[i], meta[i]["target_text"], lang) for i in idx) / len(idx)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        return metrics
