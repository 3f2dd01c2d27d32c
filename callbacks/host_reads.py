"""Count device->host reads per training step, to keep the steps between logging intervals free of them.

A read of a device value on the host (`.item()`, `float(t)`, `bool(t)`, `int(t)`, all of which dispatch to
`aten::_local_scalar_dense`) waits for every queued GPU kernel, so the GPU idles while the host catches up.
Two counters, attributed to the step whose `on_train_batch_start` came last:
- `reads`: `aten::_local_scalar_dense` calls seen by a TorchDispatchMode (any device; eager code only, so
  turn it off with `dispatch: false` for compiled models);
- `syncs` (CUDA only): every operation torch reports as synchronizing in `torch.cuda.set_sync_debug_mode`
  (those reads plus blocking copies such as `.cpu()`, `.tolist()` and pageable host->device copies).

Steps are classified so a test or a benchmark can ask for the steady state: "logging" (Lightning writes logs
at its end), "first", "validation", "checkpoint", "epoch_end", "final", or "plain" (none of those).
    python main.py fit --config configs/smoke.yaml --trainer.callbacks+=callbacks.host_reads.HostReadCounter
prints a per-class summary at the end of training.
"""

from __future__ import annotations

import warnings
from collections import defaultdict

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils._python_dispatch import TorchDispatchMode

from callbacks.log_interval import is_logging_step

SYNC_WARNING = "called a synchronizing CUDA operation"
PRIORITY = ("final", "first", "validation", "checkpoint", "epoch_end", "logging")


class _ScalarReads(TorchDispatchMode):
    def __init__(self, on_read):
        super().__init__()
        self.on_read = on_read

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.on_read()
        return func(*args, **(kwargs or {}))


class HostReadCounter(L.Callback):
    def __init__(self, dispatch: bool = True, cuda_sync_debug: bool = True, report: bool = True):
        self.dispatch = dispatch
        self.cuda_sync_debug = cuda_sync_debug
        self.report = report
        self.reads: dict[int, int] = defaultdict(int)
        self.syncs: dict[int, int] = defaultdict(int)
        self.kinds: dict[int, set[str]] = defaultdict(set)
        self.step: int | None = None
        self._mode: _ScalarReads | None = None
        self._showwarning = None
        self._sync_mode = None
        self._first: int | None = None

    # ------------------------------------------------------------------------------------------- counting
    def _count_read(self) -> None:
        if self.step is not None:
            self.reads[self.step] += 1

    def _start(self, trainer) -> None:
        if self.dispatch:
            self._mode = _ScalarReads(self._count_read)
            self._mode.__enter__()
        if self.cuda_sync_debug and trainer.strategy.root_device.type == "cuda":
            self._sync_mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
            warnings.filterwarnings("always", message=f".*{SYNC_WARNING}.*")
            previous = self._showwarning = warnings.showwarning

            def show(message, category, filename, lineno, file=None, line=None):
                if SYNC_WARNING in str(message):
                    if self.step is not None:
                        self.syncs[self.step] += 1
                    return
                previous(message, category, filename, lineno, file, line)

            warnings.showwarning = show

    def _stop(self) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        if self._sync_mode is not None:
            torch.cuda.set_sync_debug_mode(self._sync_mode)
            warnings.showwarning = self._showwarning
            self._sync_mode = None

    # ------------------------------------------------------------------------------------------- hooks
    def setup(self, trainer, pl_module, stage: str) -> None:
        # first in line, so other callbacks' batch-start work (e.g. LearningRateMonitor) counts for its own step
        if trainer.callbacks and trainer.callbacks[0] is not self:
            trainer.callbacks.remove(self)
            trainer.callbacks.insert(0, self)

    def on_train_start(self, trainer, pl_module) -> None:
        self._first = trainer.global_step
        self._start(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.step = trainer.global_step
        kinds = self.kinds[self.step]  # every step gets an entry, reads or not
        if self.step == self._first:
            kinds.add("first")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if is_logging_step(trainer) and self.step is not None:
            self.kinds[self.step].add("logging")

    def _mark(self, kind: str) -> None:
        if self.step is not None:
            self.kinds[self.step].add(kind)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._mark("validation")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._mark("checkpoint")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._mark("epoch_end")

    def on_train_end(self, trainer, pl_module) -> None:
        self._mark("final")
        self._stop()
        if self.report and trainer.is_global_zero:
            rank_zero_info(f"host reads per training step: {self.summary()}")

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._stop()

    # ------------------------------------------------------------------------------------------- results
    def kind(self, step: int) -> str:
        kinds = self.kinds.get(step, set())
        return next((k for k in PRIORITY if k in kinds), "plain")

    def steps(self) -> list[int]:
        return sorted(set(self.kinds) | set(self.reads) | set(self.syncs))

    def summary(self) -> dict[str, dict[str, float]]:
        """Per step class: steps, and total / max reads and syncs per step."""
        out: dict[str, dict[str, float]] = {}
        for step in self.steps():
            row = out.setdefault(self.kind(step), {"steps": 0, "reads": 0, "max_reads": 0, "syncs": 0, "max_syncs": 0})
            row["steps"] += 1
            row["reads"] += self.reads.get(step, 0)
            row["max_reads"] = max(row["max_reads"], self.reads.get(step, 0))
            row["syncs"] += self.syncs.get(step, 0)
            row["max_syncs"] = max(row["max_syncs"], self.syncs.get(step, 0))
        return out
