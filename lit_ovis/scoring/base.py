"""One scorer interface for evaluation, DPO pair ranking and GRPO rewards.

`Scorer.score(images, prompts, metadata) -> FloatTensor[B]` where images are FloatTensor[B,3,H,W] in
[0, 1] or a list of PIL images, and metadata carries per-sample fields (`target_text`, `language`).
Scorers register by name; `build_scorer("ocr")` makes one.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from lit_ovis.errors import ConfigError

REGISTRY: dict[str, Callable[..., "Scorer"]] = {}


def register(name: str):
    def wrap(cls):
        REGISTRY[name] = cls
        cls.name = name
        return cls

    return wrap


def build_scorer(name: str, **kwargs) -> "Scorer":
    if name not in REGISTRY:
        raise ConfigError(f"unknown scorer '{name}'; choose one of {sorted(REGISTRY)}")
    return REGISTRY[name](**kwargs)


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
        n = len(images)
        metadata = list(metadata) if metadata is not None else [{} for _ in range(n)]
        out = []
        for i in range(0, n, self.batch_size):
            out.append(self._score_batch(images[i : i + self.batch_size], list(prompts[i : i + self.batch_size]), metadata[i : i + self.batch_size]))
        return torch.cat(out).float().cpu() if out else torch.zeros(0)

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
