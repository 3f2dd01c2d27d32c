"""Weighted ensemble of scorers with per-scorer normalisation; returns the total and every component
(GRPO logs each reward; make-pairs ranks by the total)."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from lit_ovis.errors import ConfigError
from lit_ovis.scoring.base import Scorer, build_scorer


def normalise(scores: torch.Tensor, mode: str, bounds: tuple[float, float] | None = None, eps: float = 1e-6) -> torch.Tensor:
    """`none`; `zscore` over the batch; `minmax` to [0, 1] with fixed `bounds` (or the batch range)."""
    if mode == "none":
        return scores
    if mode == "zscore":
        if scores.numel() < 2:
            return torch.zeros_like(scores)
        return (scores - scores.mean()) / (scores.std() + eps)
    if mode == "minmax":
        lo, hi = bounds if bounds is not None else (float(scores.min()), float(scores.max()))
        return ((scores - lo) / max(hi - lo, eps)).clamp(0, 1)
    raise ConfigError(f"unknown score normalisation '{mode}': use none, zscore or minmax")


class ScorerEnsemble:
    def __init__(self, scorers: dict[str, Scorer], weights: dict[str, float] | None = None, normalisation: str = "none", bounds: dict[str, tuple[float, float]] | None = None):
        if not scorers:
            raise ConfigError("a scorer ensemble needs at least one scorer")
        self.scorers = scorers
        self.weights = {name: float((weights or {}).get(name, 1.0)) for name in scorers}
        self.normalisation = normalisation
        self.bounds = bounds or {}

    @classmethod
    def from_config(cls, spec: dict[str, Any]) -> "ScorerEnsemble":
        """`{"scorers": {"ocr": {"weight": 1.0, ...kwargs}, "brightness": {"weight": 0.1}}, "normalisation": "none"}`"""
        scorers, weights, bounds = {}, {}, {}
        for name, kwargs in (spec.get("scorers") or {}).items():
            kwargs = dict(kwargs or {})
            weights[name] = kwargs.pop("weight", 1.0)
            if "bounds" in kwargs:
                bounds[name] = tuple(kwargs.pop("bounds"))
            scorers[name] = build_scorer(kwargs.pop("type", name), **kwargs)
        return cls(scorers, weights, spec.get("normalisation", "none"), bounds)

    def __call__(self, images, prompts: Sequence[str], metadata: Sequence[dict] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        components = {name: s.score(images, prompts, metadata) for name, s in self.scorers.items()}
        total = sum(self.weights[n] * normalise(c, self.normalisation, self.bounds.get(n)) for n, c in components.items())
        return total, components
