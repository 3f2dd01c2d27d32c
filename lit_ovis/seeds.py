"""Seeds derived from the run seed (`seed_everything`, the configs' `seed_everything: 0`), so every random
stream of a run (training noise, rollouts, generated pair candidates) is reproducible from one number, and a
resumed run redraws exactly what the uninterrupted run drew without checkpointing generator states."""

from __future__ import annotations

import os

SEED_MODULUS = 2**63 - 1


def run_seed() -> int:
    """The seed `seed_everything` set for this run (Lightning exports it as PL_GLOBAL_SEED); 0 when unset."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def mix_seed(seed: int, rank: int = 0, step: int = 0, index: int = 0) -> int:
    """One seed per (run seed, rank, step, index). A linear mix, the one earlier versions used for the training
    noise (so those runs redraw the same noise); two calls can collide only when the weighted terms overlap
    (e.g. index 131 at step s and index 0 at step s + 1), which callers avoid by using `index` for a
    micro-batch or a stream id and `step` for the optimizer step."""
    return (seed * 1_000_003 + rank * 7_919 + step * 131 + index) % SEED_MODULUS
