"""Deliberate faults for fault-tolerance tests and drills, at a given global step:

- `step`: SIGKILL this process in the middle of a training step (after backward, before the optimizer update);
- `save`: SIGKILL it in the middle of a checkpoint write (temp file half written, never renamed);
- `nan_grad`: from that step on, every gradient is NaN (what a diverged run looks like to NanGuard).
"""

from __future__ import annotations

import os
import signal

import lightning as L

from lit_ovis.checkpoint_io import temp_path

PHASES = ("step", "save", "nan_grad")


class FaultInjector(L.Callback):
    def __init__(self, kill_at_step: int = -1, phase: str = "step"):
        if phase not in PHASES:
            raise ValueError(f"FaultInjector.phase must be one of {PHASES}, got {phase!r}")
        self.kill_at_step = kill_at_step  # the step the fault fires at (nan_grad: the first poisoned step)
        self.phase = phase

    def on_after_backward(self, trainer, pl_module) -> None:
        if self.phase == "nan_grad" and 0 <= self.kill_at_step <= trainer.global_step:
            for p in pl_module.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))

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
                with open(temp_path(path), "wb") as f:
                    f.write(b"\x80\x02partial checkpoint")
                    f.flush()
                    os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            return original(checkpoint, path, storage_options)

        io.save_checkpoint = dying_save

