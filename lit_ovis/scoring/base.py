"""One scorer interface for evaluation, DPO pair ranking and GRPO rewards.

`Scorer.score(images, prompts, metadata) -> FloatTensor[B]` where images are FloatTensor[B,3,H,W] in
[0, 1] or a list of PIL images, and metadata carries per-sample fields (`target_text`, `language`).
`score_with_details` also returns per-sample extras (the OCR scorer's text and all text metrics, so one OCR
read serves every metric). Scorers register by name; `build_scorer("ocr")` makes one.

A scorer that lacks a weight file raises `MissingInput(key, problem)`; `build_scorer` turns it into a one-line
`ConfigError` naming how the *calling command* sets that key (`option`), e.g. `--clip-model` for `eval`.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from lit_ovis.errors import ConfigError

REGISTRY: dict[str, Callable[..., "Scorer"]] = {}
OptionHint = Callable[[str, str], str]  # (scorer name, constructor key) -> how the user sets it


def register(name: str):
    def wrap(cls):
        REGISTRY[name] = cls
        cls.name = name
        return cls

    return wrap


class MissingInput(Exception):
    """A scorer input the user must provide (weights path, head file): `key` is the constructor argument."""

    def __init__(self, key: str, problem: str):
        super().__init__(problem)
        self.key, self.problem = key, problem


def python_hint(scorer: str, key: str) -> str:
    return f"build_scorer('{scorer}', {key}=...)"


def json_option(flag: str) -> OptionHint:
    """Hint for commands that take per-scorer keyword arguments as JSON (make-pairs, GRPO, the callback)."""
    return lambda scorer, key: f"{flag} '{{\"{scorer}\": {{\"{key}\": \"...\"}}}}'"


def flag_options(flags: dict[str, str], fallback: OptionHint) -> OptionHint:
    """Hint that names a dedicated flag for some keys (e.g. eval's --clip-model) and `fallback` otherwise."""
    return lambda scorer, key: flags[key] if key in flags else fallback(scorer, key)


def build_scorer(name: str, option: OptionHint | None = None, **kwargs) -> "Scorer":
    if name not in REGISTRY:
        raise ConfigError(f"unknown scorer '{name}'; choose one of {sorted(REGISTRY)}")
    try:
        inspect.signature(REGISTRY[name]).bind(**kwargs)
    except TypeError as err:
        raise ConfigError(f"scorer '{name}': {err}; it accepts {list(inspect.signature(REGISTRY[name]).parameters)}") from None
    try:
        return REGISTRY[name](**kwargs)
    except MissingInput as err:
        raise ConfigError(f"scorer '{name}': {err.problem}; set {(option or python_hint)(name, err.key)}") from None


def to_pil(images) -> list[Image.Image]:
    if isinstance(images, torch.Tensor):
        arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in arr]
    return [im.convert("RGB") for im in images]


def to_tensor(images) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images.float().clamp(0, 1)
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


class Scorer:
    name = "scorer"
    higher_is_better = True

    def __init__(self, batch_size: int = 16, device: str | torch.device = "cpu"):
        self.batch_size = batch_size
        self.device = torch.device(device)

    def score(self, images, prompts: Sequence[str], metadata: Sequence[dict[str, Any]] | None = None) -> torch.Tensor:
        return self.score_with_details(images, prompts, metadata)[0]

    def score_with_details(self, images, prompts: Sequence[str], metadata: Sequence[dict[str, Any]] | None = None
                           ) -> tuple[torch.Tensor, list[dict]]:
        """Scores [B] and one dict of extras per sample, computed in batches of `batch_size`."""
        n = len(images)
        metadata = list(metadata) if metadata is not None else [{} for _ in range(n)]
        scores, details = [], []
        for i in range(0, n, self.batch_size):
            s, d = self._score_batch_with_details(images[i: i + self.batch_size], list(prompts[i: i + self.batch_size]),
                                                  metadata[i: i + self.batch_size])
            scores.append(torch.as_tensor(s).float().reshape(-1).cpu())
            details.extend(d)
        return (torch.cat(scores) if scores else torch.zeros(0)), details

    def _score_batch_with_details(self, images, prompts: list[str], metadata: list[dict]):
        return self._score_batch(images, prompts, metadata), [{} for _ in range(len(images))]

    def _score_batch(self, images, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        raise NotImplementedError


@register("brightness")
class BrightnessScorer(Scorer):
    """Mean luminance (Rec. 601) in [0, 1]: a computable reward for RL sanity checks."""

    def _score_batch(self, images, prompts, metadata):
        x = to_tensor(images)
        return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).flatten(1).mean(1)


@register("contrast")
class ContrastScorer(Scorer):
    """Standard deviation of luminance: legible text needs contrast."""

    def _score_batch(self, images, prompts, metadata):
        x = to_tensor(images)
        return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).flatten(1).std(1)
