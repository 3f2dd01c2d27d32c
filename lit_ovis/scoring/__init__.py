"""Scorers shared by evaluation, DPO pair construction and GRPO rewards."""

from lit_ovis.scoring import clip, ocr  # noqa: F401  (registers the scorers)
from lit_ovis.scoring.base import (REGISTRY, BrightnessScorer, ContrastScorer, MissingInput, Scorer, build_scorer,
                                   flag_options, json_option)
from lit_ovis.scoring.ensemble import ScorerEnsemble, normalise

__all__ = ["REGISTRY", "BrightnessScorer", "ContrastScorer", "MissingInput", "Scorer", "ScorerEnsemble", "build_scorer",
           "flag_options", "json_option", "normalise"]
