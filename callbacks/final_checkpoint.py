"""Save `last` at the final step. Lightning's `ModelCheckpoint(save_last=True)` writes `last` when training
ends only if it saved nothing earlier in the run, so a run whose `max_steps` is not a multiple of
`every_n_train_steps` (400 steps, checkpoints every 250) ended with `last` at step 250 and lost its final 150
steps. The CLI adds this callback to every run with such a checkpoint; at the end of training it writes `last`
for each one whose newest save is older than the final step (through the run's atomic checkpoint IO)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class FinalCheckpoint(L.Callback):
    def on_train_end(self, trainer, pl_module) -> None:
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.save_last and cb._last_global_step_saved != trainer.global_step:
                cb._save_last_checkpoint(trainer, cb._monitor_candidates(trainer))
