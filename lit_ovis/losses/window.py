"""The GRPO training window as one small unit: its settings, its state (per-step scores and the exploration
RNG) and the two things it does, choose the window of an iteration and learn from a new per-step signal.
The math is the pure functions of `lit_ovis.losses.grpo`; reducing a signal over ranks is the caller's
(`lit_ovis.parallel.collectives.mean_over_ranks`), so every rank holds the same state and picks the same window.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from lit_ovis.errors import ConfigError
from lit_ovis.losses.grpo import fixed_window, select_window, sliding_window_start, update_step_scores

MODES = ("adaptive", "sliding", "fixed", "all")
SIGNALS = ("noise", "logp_change")


@dataclass
class WindowConfig:
    """Which denoising steps of a rollout an iteration trains on (a contiguous window of stochastic steps)."""

    mode: str = "adaptive"
    """"adaptive" (best-scoring window), "sliding" (scheduled, noisy -> clean, MixGRPO), "fixed" or "all"."""
    size: int = 4
    """Denoising steps trained per iteration."""
    start: int = 0
    """First step of the window for mode "fixed"."""
    shift_every: int = 25
    """Mode "sliding": iterations before the window moves `stride` steps towards the clean end."""
    stride: int = 1
    """Mode "sliding": steps the window moves each time."""
    signal: str = "noise"
    """Mode "adaptive": per-step score, "noise" (how much of the reward each step's noise explains, every step,
    every iteration) or "logp_change" (advantage-weighted log-prob change, trained steps only)."""
    ema: float = 0.9
    """Mode "adaptive": decay of the per-step scores' moving average."""
    explore: float = 0.1
    """Signal "logp_change": chance of a random window, so that untrained steps get scored too."""

    def check(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"--model.grpo.window.mode must be one of {MODES}, got {self.mode!r}")
        if self.signal not in SIGNALS:
            raise ConfigError(f"--model.grpo.window.signal must be one of {SIGNALS}, got {self.signal!r}")


class TrainingWindow:
    def __init__(self, cfg: WindowConfig, seed: int = 0):
        cfg.check()
        self.cfg = cfg
        self.scores: torch.Tensor | None = None  # per-step moving average (adaptive mode)
        self.rng = random.Random(seed)  # exploration; the same seed on every rank

    @property
    def scores_noise(self) -> bool:
        """The caller must `observe` the noise signal of every iteration before `choose`."""
        return self.cfg.mode == "adaptive" and self.cfg.signal == "noise"

    @property
    def scores_updates(self) -> bool:
        """The caller must `observe` the log-prob change of the trained steps after each update."""
        return self.cfg.mode == "adaptive" and self.cfg.signal == "logp_change"

    def choose(self, valid: torch.Tensor, iteration: int) -> tuple[int, int]:
        """[start, end) of this iteration's window among K steps; `valid` [K] marks the stochastic ones."""
        cfg = self.cfg
        valid = valid.bool().cpu()
        k = valid.numel()
        if cfg.mode == "all":
            return fixed_window(k, 0, 0, valid)
        if cfg.mode == "fixed":
            return fixed_window(k, cfg.start, cfg.size, valid)
        if cfg.mode == "sliding":  # derived from the iteration count, so a resumed run continues the schedule
            start = sliding_window_start(iteration, int(valid.sum()), cfg.size, cfg.shift_every, cfg.stride)
            return fixed_window(k, start, cfg.size, valid)
        if self.scores_updates and (self.scores is None or self.rng.random() < cfg.explore):
            # logp_change scores exist only for trained steps: explore a random window (same seed on all ranks)
            if self.scores is None:
                self.scores = torch.zeros(k)
            starts = [s for s in range(k - cfg.size + 1) if bool(valid[s:s + cfg.size].all())]
            start = self.rng.choice(starts) if starts else 0
            return fixed_window(k, start, cfg.size, valid)
        return select_window(self.scores, cfg.size, valid)

    def observe(self, signal: torch.Tensor, seen: torch.Tensor | None = None) -> None:
        """Fold a per-step signal [K] into the scores (only the steps where `seen`, when given)."""
        new = update_step_scores(self.scores, signal.cpu(), self.cfg.ema)
        self.scores = new if seen is None else torch.where(seen, new, self.scores)

    def state_dict(self) -> dict:
        return {"step_scores": self.scores, "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.scores = state["step_scores"]
        self.rng.setstate(state["rng"])
