"""Deliberate crashes for fault-tolerance tests and drills: SIGKILL this process at a given step, either in
the middle of a training step (after backward, before the optimizer update) or in the middle of a
checkpoint write (temp file half written, never renamed)."""

from __future__ import annotations

import os
import signal

import lightning as L


class FaultInjector(L.Callback):
    def __init__(self, kill_at_step: int = -1, phase: str = "step"):
        if phase not in ("step", "save"):
            raise ValueError("FaultInjector.phase must be 'step' or 'save'")
        self.kill_at_step = kill_at_step
        self.phase = phase

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.phase == "step" and trainer.global_step == self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.phase != "save" or self.kill_at_step < 0:
            return
        io = trainer.strategy.checkpoint_io
        original = io.save_checkpoint
        target = self.kill_at_step

        def dying_save(checkpoint, path, storage_options=None):
            if trainer.global_step >= target:
                # Write half of a temp file next to the target, exactly like an interrupted save.
                tmp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.tmp-{os.getpid()}"
                with open(tmp, "wb") as f:
                    f.write(b"\x80\x02partial checkpoint")
                os.kill(os.getpid(), signal.SIGKILL)
            return original(checkpoint, path, storage_options)

        io.save_checkpoint = dying_save
