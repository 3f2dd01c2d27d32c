"""Evaluation during training: every N optimizer steps, sample a small fixed prompt set through the stage
module's `sample()` and log the scorers' means and the OCR metrics (CVTG-2K word accuracy / NED pooled over
target words, LongText-Bench text accuracy), overall and for EN and ZH separately. One OCR read per image.

Under gradient accumulation `on_train_batch_end` runs once per micro-batch while `global_step` only moves on
optimizer steps, so the callback fires when `global_step` changes, never twice for the same step (and not
again for the step a resumed run starts at).

The prompt file is read when the first evaluation runs, so it may be one the data module builds in setup (the
demo's held-out split). Records that carry their own `width`/`height` (the word task's) are sampled at that
size unless the callback sets one. `at_end` evaluates once more when training ends and prints one line with
the OCR word accuracy (the demo's last line)."""

from __future__ import annotations

from collections import defaultdict

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from lit_ovis.scoring import ScorerEnsemble
from lit_ovis.scoring.base import to_pil
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
                 height: int | None = None, width: int | None = None, scorer_kwargs: dict[str, dict] | None = None,
                 at_end: bool = False):
        """every_n_steps: evaluate every N optimizer steps (0: never during training).
        at_end: also evaluate when training ends and print one summary line."""
        self.prompt_file, self.limit = prompt_file, limit
        self._items: list[dict] | None = None if prompt_file else DEFAULT_SET
        self.every_n_steps, self.at_end = every_n_steps, at_end
        self.scorer_names = scorers if scorers is not None else ["ocr"]
        self.scorer_kwargs = scorer_kwargs or {}
        self._ensemble: ScorerEnsemble | None = None
        self.seed, self.batch_size = seed, batch_size
        self.kwargs = dict(steps=steps, guidance_scale=guidance_scale, height=height, width=width)
        self._last_step: int | None = None
        self._last_eval: tuple[int, dict, int | None] | None = None  # (step, metrics, words): reused by the end of training

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step  # a resumed run does not re-run the eval of the step it resumes at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step:  # a micro-batch that did not complete an optimizer step
            return
        self._last_step = step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0:
            self.run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_end:
            done = self._last_eval
            if not (done and done[0] == trainer.global_step):
                self.run(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.at_end and self._last_eval is not None:  # printed last, after the progress log's closing line
            self.print_summary(*self._last_eval)

    @rank_zero_only
    def print_summary(self, step: int, metrics: dict[str, float], words: int | None) -> None:
        parts = [f"OCR word accuracy {metrics.get('eval/word_accuracy', float('nan')):.3f}",
                 f"NED {metrics.get('eval/ned', float('nan')):.3f}"]
        parts += [f"{lang.upper()} {metrics[f'eval/{lang}_word_accuracy']:.3f}" for lang in ("en", "zh") if f"eval/{lang}_word_accuracy" in metrics]
        source = self.prompt_file or "the built-in prompts"
        print(f"eval at step {step}: {', '.join(parts)} ({len(self.items)} samples, {words} words of {source})", flush=True)

    @property
    def items(self) -> list[dict]:
        if self._items is None:
            self._items = read_prompt_set(self.prompt_file, self.limit)
        return self._items

    def _sample(self, pl_module):
        """Every item's image, in item order; each size group batched together (a record's own size unless the
        callback sets one)."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, it in enumerate(self.items):
            groups[(self.kwargs["height"] or it.get("height"), self.kwargs["width"] or it.get("width"))].append(i)
        images: list[torch.Tensor | None] = [None] * len(self.items)
        for (height, width), idx in groups.items():
            for k in range(0, len(idx), self.batch_size):
                chunk = idx[k: k + self.batch_size]
                out = pl_module.sample([self.items[i]["prompt"] for i in chunk], seed=[self.seed + i for i in chunk],
                                       steps=self.kwargs["steps"], guidance_scale=self.kwargs["guidance_scale"], height=height, width=width)
                for i, image in zip(chunk, out.float().cpu()):
                    images[i] = image
        if len(groups) == 1:
            return torch.stack(images)
        return [to_pil(image[None])[0] for image in images]  # scorers take a list of PIL images of any sizes

    @property
    def ensemble(self) -> ScorerEnsemble:
        if self._ensemble is None:
            self._ensemble = build_ensemble({n: 1.0 for n in self.scorer_names}, self.scorer_kwargs,
                                            weights_option="EvalCallback init_args.scorers",
                                            kwargs_option="EvalCallback init_args.scorer_kwargs")
        return self._ensemble

    @torch.no_grad()
    def run(self, trainer, pl_module) -> dict[str, float]:
        images = self._sample(pl_module)
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
        self._last_eval = (trainer.global_step, metrics, (agg.get("all") or {}).get("words"))
        return metrics
