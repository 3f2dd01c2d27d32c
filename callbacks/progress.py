"""Progress for step-budgeted runs, with metrics read on the host only at the logging interval.

- `StepProgressBar` (stdout is a terminal): Lightning's rich bar showing `step 120/300` instead of its
  `Epoch 9/-2` (the rich bar prints max_epochs - 1, i.e. -2, when only `max_steps` bounds the run).
- `StepProgressLog` (stdout redirected to a file, SLURM): one plain line per logging interval,
  `step 120/300 | loss 0.0951 | 46.2 samples/s | 1.52 TFLOP/s | elapsed 0:00:31 | ETA 0:00:47`, plus one line per
  validation and one at the end. `lit_ovis.cli` installs whichever fits `sys.stdout`.

Stages log their step metrics without `prog_bar=True` (Lightning reads prog_bar values on the host after every
batch, a GPU sync each); both displays take the `DISPLAY` metrics from `trainer.callback_metrics` on logging
steps only (`callbacks.log_interval`), so steps in between read nothing.
"""

from __future__ import annotations

import math
import sys
import time
from datetime import timedelta

import torch
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

from callbacks.log_interval import is_logging_step

# label on the display -> logged metric (whichever the stage and callbacks log)
DISPLAY = {
    "loss": "train/loss",
    "reward": "train/reward",
    "acc": "train/implicit_acc",
    "samples/s": "perf/samples_per_s",
    "TFLOP/s": "perf/tflops_per_device",
    "MFU": "perf/mfu",
}


def read_display_metrics(trainer, display: dict[str, str] = DISPLAY) -> dict[str, float]:
    """The display metrics logged so far, as floats (one host read each: call on logging steps only)."""
    metrics = trainer.callback_metrics
    return {label: float(metrics[key]) for label, key in display.items() if key in metrics}


def total_steps(trainer) -> int | None:
    """The run's optimizer-step budget, or None when it is unbounded."""
    if trainer.max_steps and trainer.max_steps > 0:
        return int(trainer.max_steps)
    estimated = trainer.estimated_stepping_batches
    return int(estimated) if math.isfinite(estimated) else None


def batch_items(batch) -> int:
    """Samples in one batch on this rank (latents, preference pairs or prompts), from host metadata."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for value in batch:
            if isinstance(value, torch.Tensor) and value.ndim:
                return int(value.shape[0])
        for value in batch:
            if isinstance(value, (list, tuple)):
                return len(value)
    return 0


def hms(seconds: float) -> str:
    return str(timedelta(seconds=int(max(seconds, 0))))


def fmt(value: float) -> str:
    return f"{value:.4g}"


class StepProgressBar(RichProgressBar):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._shown: dict[str, float] = {}

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_epochs is not None and trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch}"
        return f"{description:{len(self.validation_description)}}" if len(self.validation_description) > len(description) else description

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if is_logging_step(trainer):
            self._shown = read_display_metrics(trainer)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer, pl_module):
        metrics = {**super().get_metrics(trainer, pl_module), **{k: fmt(v) for k, v in self._shown.items()}}
        total = total_steps(trainer)
        if total:
            metrics = {"step": f"{trainer.global_step}/{total}", **metrics}
        return metrics


class StepProgressLog(ProgressBar):
    """Plain progress lines for logs that are not a terminal (rank 0 only)."""

    def __init__(self, stream=None, clock=time.monotonic):
        super().__init__()
        self.stream = stream
        self.clock = clock
        self._enabled = True
        self._start = self._last = 0.0
        self._start_step = 0
        self._items = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    @property
    def is_disabled(self) -> bool:
        return not self._enabled

    def _write(self, line: str) -> None:
        if self._enabled:
            print(line, file=self.stream or sys.stdout, flush=True)

    def _step(self, trainer) -> str:
        total = total_steps(trainer)
        return f"step {trainer.global_step}/{total}" if total else f"step {trainer.global_step}"

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = self._last = self.clock()
        self._start_step = trainer.global_step
        self._items = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._items += batch_items(batch)
        if not self._enabled or not is_logging_step(trainer):
            return
        now = self.clock()
        parts = [self._step(trainer)]
        shown = read_display_metrics(trainer)
        shown.pop("samples/s", None)  # measured here, so the line has it with or without ThroughputLogger
        parts += [f"{label} {fmt(value)}" for label, value in shown.items()]
        if now > self._last:
            parts.append(f"{self._items * trainer.world_size / (now - self._last):.4g} samples/s")
        elapsed, done = now - self._start, trainer.global_step - self._start_step
        parts.append(f"elapsed {hms(elapsed)}")
        total = total_steps(trainer)
        if total and done > 0:
            parts.append(f"ETA {hms(elapsed / done * (total - trainer.global_step))}")
        self._write(" | ".join(parts))
        self._last, self._items = now, 0

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if val:
            self._write(" | ".join([self._step(trainer)] + [f"{k} {fmt(v)}" for k, v in sorted(val.items())]))

    def on_train_end(self, trainer, pl_module) -> None:
        self._write(f"done: {self._step(trainer)} in {hms(self.clock() - self._start)}")


def progress_for_stdout(stream=None) -> ProgressBar:
    """The rich bar on a terminal, plain lines otherwise (redirected logs, SLURM)."""
    stream = stream or sys.stdout
    return StepProgressBar() if getattr(stream, "isatty", lambda: False)() else StepProgressLog()
