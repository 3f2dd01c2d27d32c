"""Evaluation during training: every N optimizer steps, sample a small fixed prompt set through the stage
module's `sample()` and log the scorers' means and the OCR metrics (CVTG-2K word accuracy / NED pooled over
target words, LongText-Bench text accuracy), overall and for EN and ZH separately. One OCR read per image.

Under gradient accumulation `on_train_batch_end` runs once per micro-batch while `global_step` only moves on
optimizer steps, so the callback fires when `global_step` changes, never twice for the same step (and not
again for the step a resumed run starts at)."""

from __future__ import annotations

import lightning as L
import torch

from lit_ovis.scoring import ScorerEnsemble
from lit_ovis.scoring.ensemble import build_ensemble
from lit_ovis.scoring.metrics import aggregate
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
                 height: int | None = None, width: int | None = None, scorer_kwargs: dict[str, dict] | None = None):
        self.items = read_prompt_set(prompt_file, limit) if prompt_file else DEFAULT_SET
        self.every_n_steps = every_n_steps
        self.scorer_names = scorers if scorers is not None else ["ocr"]
        self.scorer_kwargs = scorer_kwargs or {}
        self._ensemble: ScorerEnsemble | None = None
        self.seed, self.batch_size = seed, batch_size
        self.kwargs = dict(steps=steps, guidance_scale=guidance_scale, height=height, width=width)
        self._last_step: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step  # a resumed run does not re-run the eval of the step it resumes at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step:  # a micro-batch that did not complete an optimizer step
            return
        self._last_step = step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0:
            self.run(trainer, pl_module)

    @property
    def ensemble(self) -> ScorerEnsemble:
        if self._ensemble is None:
            self._ensemble = build_ensemble({n: 1.0 for n in self.scorer_names}, self.scorer_kwargs,
                                            weights_option="EvalCallback init_args.scorers",
                                            kwargs_option="EvalCallback init_args.scorer_kwargs")
        return self._ensemble

    @torch.no_grad()
    def run(self, trainer, pl_module) -> dict[str, float]:
        images = torch.cat([
            pl_module.sample([it["prompt"] for it in self.items[k: k + self.batch_size]], seed=self.seed + k, **self.kwargs).float().cpu()
            for k in range(0, len(self.items), self.batch_size)
        ])
        prompts = [it["prompt"] for it in self.items]
        meta = [{"target_text": it.get("target_text", ""), "language": it.get("language", "en")} for it in self.items]
        raw, details = self.ensemble.components(images, prompts, meta)
        records = [{"language": m["language"], "scores": {n: float(raw[n][i]) for n in raw}, "ocr": details[i].get("ocr")}
                   for i, m in enumerate(meta)]
        agg = aggregate(records, list(raw))
        metrics: dict[str, float] = {}
        for group in ("all", "en", "zh"):
            for key, value in (agg.get(group) or {}).items():
                if key in ("samples", "words", "text_units") or value is None:
                    continue
                metrics[f"eval/{key}" if group == "all" else f"eval/{group}_{key}"] = float(value)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        return metrics
