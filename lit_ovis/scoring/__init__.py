"""Scorers shared by evaluation, DPO pair construction and GRPO rewards."""

from lit_ovis.scoring import clip, ocr  # noqa: F401  (registers the scorers)
from lit_ovis.scoring.base import REGISTRY, BrightnessScorer, ContrastScorer, Scorer, build_scorer
from lit_ovis.scoring.ensemble import ScorerEnsemble, normalise

__all__ = ["REGISTRY", "BrightnessScorer", "ContrastScorer", "Scorer", "ScorerEnsemble", "build_scorer", "normalise"]
