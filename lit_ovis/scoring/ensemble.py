"""Weighted ensemble of scorers with per-scorer normalisation: the one place where eval, make-pairs, GRPO and
the eval callback turn their scorer settings into an ensemble (`build_ensemble`) and several scorers into one number. Returns the total and every component (GRPO logs each reward;
make-pairs normalises components over its whole pool with `combine`; eval keeps the per-sample details such as
the OCR text and its metrics)."""

from __future__ import annotations

import json
from typing import Any, Callable, Sequence

import torch

from lit_ovis.errors import ConfigError
from lit_ovis.scoring.base import REGISTRY, OptionHint, Scorer, build_scorer, flag_options, json_option

NORMALISATIONS = ("none", "zscore", "minmax", "rank")


def normalise(scores: torch.Tensor, mode: str, bounds: tuple[float, float] | None = None, eps: float = 1e-6) -> torch.Tensor:
    """`none`; `zscore` over the batch; `minmax` to [0, 1] with fixed `bounds` (or the batch range);
    `rank` in [0, 1] (robust to one scorer's outliers)."""
    scores = scores.float()
    if mode == "none":
        return scores
    if mode == "zscore":
        if scores.numel() < 2:
            return torch.zeros_like(scores)
        return (scores - scores.mean()) / (scores.std() + eps)
    if mode == "minmax":
        lo, hi = bounds if bounds is not None else (float(scores.min()), float(scores.max()))
        return ((scores - lo) / max(hi - lo, eps)).clamp(0, 1)
    if mode == "rank":
        ranks = torch.empty_like(scores)
        ranks[scores.argsort()] = torch.arange(len(scores), dtype=scores.dtype)
        return ranks / max(len(scores) - 1, 1)
    raise ConfigError(f"unknown score normalisation '{mode}': use one of {NORMALISATIONS}")


def combine(components: dict[str, torch.Tensor], weights: dict[str, float], normalisation: str = "none",
            bounds: dict[str, tuple[float, float]] | None = None) -> torch.Tensor:
    """Weighted sum of normalised components (normalised over whatever set they cover: a batch or a pool)."""
    missing = set(weights) - set(components)
    if missing:
        raise ValueError(f"combine needs every scorer's scores; missing {sorted(missing)}")
    bounds = bounds or {}
    return sum(float(w) * normalise(components[n], normalisation, bounds.get(n)) for n, w in weights.items())


class _FunctionScorer(Scorer):
    """A plain fn(images, prompts, metadata) -> [N] (tests, notebooks, GRPO's `reward_fns`) as a Scorer."""

    def __init__(self, fn: Callable):
        super().__init__(batch_size=1 << 30)
        self.fn = fn

    def _score_batch(self, images, prompts, metadata):
        return torch.as_tensor(self.fn(images, prompts, metadata), dtype=torch.float32).reshape(-1)


def as_scorer(s: Scorer | Callable) -> Scorer:
    return s if isinstance(s, Scorer) else _FunctionScorer(s)


class ScorerEnsemble:
    def __init__(self, scorers: dict[str, Scorer | Callable], weights: dict[str, float] | None = None,
                 normalisation: str = "none", bounds: dict[str, tuple[float, float]] | None = None):
        if not scorers:
            raise ConfigError("a scorer ensemble needs at least one scorer")
        if normalisation not in NORMALISATIONS:
            raise ConfigError(f"unknown score normalisation '{normalisation}': use one of {NORMALISATIONS}")
        self.scorers = {name: as_scorer(s) for name, s in scorers.items()}
        self.weights = {name: float((weights or {}).get(name, 1.0)) for name in scorers}
        self.normalisation = normalisation
        self.bounds = bounds or {}

    @classmethod
    def from_weights(cls, weights: dict[str, float], kwargs: dict[str, dict] | None = None, normalisation: str = "none",
                     option: OptionHint | None = None, scorers: dict[str, Scorer | Callable] | None = None) -> "ScorerEnsemble":
        """The one-call constructor: `weights` {name: w} (registry names), `kwargs` {name: {...}} for their
        constructors, `option` says how the calling command sets those kwargs (for missing-weight errors).
        `scorers` given by a caller (e.g. GRPO's `reward_fns`) replace the registry; unlisted weights are 1."""
        if scorers:
            return cls(dict(scorers), weights, normalisation)
        if not weights:
            raise ConfigError("no scorers named; give at least one, e.g. ocr=1.0")
        kwargs = kwargs or {}
        # Settings for a known scorer that is switched off (e.g. a config's clip kwargs after `rewards` was
        # overridden to ocr only) are simply unused; a name that is no scorer at all is a typo.
        unknown = set(kwargs) - set(weights) - set(REGISTRY)
        if unknown:
            raise ConfigError(f"scorer kwargs for {sorted(unknown)}, which are not scorers; known: {sorted(REGISTRY)}")
        built = {name: build_scorer(name, option, **dict(kwargs.get(name) or {})) for name in weights}
        return cls(built, weights, normalisation)

    @classmethod
    def from_config(cls, spec: dict[str, Any], option: OptionHint | None = None) -> "ScorerEnsemble":
        """`{"scorers": {"ocr": {"weight": 1.0, ...kwargs}, "brightness": {"weight": 0.1}}, "normalisation": "none"}`"""
        scorers, weights, bounds = {}, {}, {}
        for name, kwargs in (spec.get("scorers") or {}).items():
            kwargs = dict(kwargs or {})
            weights[name] = kwargs.pop("weight", 1.0)
            if "bounds" in kwargs:
                bounds[name] = tuple(kwargs.pop("bounds"))
            scorers[name] = build_scorer(kwargs.pop("type", name), option, **kwargs)
        return cls(scorers, weights, spec.get("normalisation", "none"), bounds)

    def components(self, images, prompts: Sequence[str], metadata: Sequence[dict] | None = None, only: Sequence[str] | None = None
                   ) -> tuple[dict[str, torch.Tensor], list[dict[str, dict]]]:
        """Raw scores per scorer and, per sample, each scorer's extras ({"ocr": {"ocr_text": ..., ...}})."""
        names = list(only) if only is not None else list(self.scorers)
        details: list[dict[str, dict]] = [{} for _ in range(len(images))]
        raw = {}
        for name in names:
            raw[name], extra = self.scorers[name].score_with_details(images, prompts, metadata)
            for d, e in zip(details, extra):
                if e:
                    d[name] = e
        return raw, details

    def combine(self, components: dict[str, torch.Tensor]) -> torch.Tensor:
        return combine(components, self.weights, self.normalisation, self.bounds)

    def __call__(self, images, prompts: Sequence[str], metadata: Sequence[dict] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        components, _ = self.components(images, prompts, metadata)
        return self.combine(components), components


def parse_weights(spec: str, option: str = "--scorers") -> dict[str, float]:
    """'ocr=1,clip=0.5' -> {'ocr': 1.0, 'clip': 0.5}; a bare name weighs 1."""
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, w = part.partition("=")
        try:
            out[name.strip()] = float(w) if w else 1.0
        except ValueError:
            raise ConfigError(f"{option}: bad weight in '{part}'; use name=weight, e.g. ocr=1.0,clip=0.5") from None
    if not out:
        raise ConfigError(f"{option} is empty; name at least one scorer, e.g. {option} ocr=1.0")
    return out


def build_ensemble(weights: str | dict[str, float], kwargs: str | dict[str, dict] | None = None, normalisation: str = "none", *,
                   weights_option: str = "--scorers", kwargs_option: str = "--scorer-kwargs", normalisation_option: str = "--normalise",
                   flags: dict[str, str] | None = None, defaults: dict[str, dict] | None = None,
                   scorers: dict[str, Scorer | Callable] | None = None) -> ScorerEnsemble:
    """A scorer ensemble from a command's settings, as every command spells them: `weights` as 'ocr=1,clip=0.5'
    or {name: weight}, `kwargs` as JSON text or {name: {...}} for the scorers' constructors. The `*_option`
    names and `flags` ({constructor key: dedicated flag}, e.g. eval's --clip-model) are how the command's user
    sets each value: errors name them. `defaults` {name: {...}} fill keys that `kwargs` leaves unset (e.g. the
    model path of eval's --clip-model). `scorers` given by a caller (tests, notebooks, GRPO's `reward_fns`)
    replace the registry."""
    if isinstance(weights, str):
        weights = parse_weights(weights, weights_option)
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{kwargs_option} is not valid JSON ({err.msg}); e.g. '{{\"clip\": {{\"model_path\": \"/models/clip\"}}}}'") from None
    kwargs = {name: {**(defaults or {}).get(name, {}), **dict(value or {})} for name, value in {**(defaults or {}), **(kwargs or {})}.items()}
    if normalisation not in NORMALISATIONS:
        raise ConfigError(f"{normalisation_option} must be {', '.join(NORMALISATIONS[:-1])} or {NORMALISATIONS[-1]}, got '{normalisation}'")
    option = json_option(kwargs_option)
    return ScorerEnsemble.from_weights(weights, kwargs, normalisation, flag_options(flags, option) if flags else option, scorers)

