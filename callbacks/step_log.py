"""An append-only JSON-lines record of every optimizer step: step, loss and the sample ids it trained on.
Audits that a resumed run neither repeated nor skipped data, and makes loss curves easy to diff.

Losses stay on the device until the file is written, all at once (one host read), on logging steps
(`callbacks.log_interval`; or every `flush_every_n_steps`), before every checkpoint and at the end: a run
killed between two checkpoints loses only records of steps that its resume will redo anyway."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from callbacks.log_interval import is_logging_step


class StepLog(L.Callback):
    def __init__(self, path: str | None = None, every_n_steps: int = 1, flush_every_n_steps: int | None = None):
        """every_n_steps: record every Nth optimizer step. flush_every_n_steps: write the records every N steps
        (one host read each time); None writes them on the trainer's logging steps."""
        self.path = path
        self.every_n_steps = every_n_steps
        self.flush_every_n_steps = flush_every_n_steps
        self._pending: list[tuple[int, torch.Tensor | None, list[str] | None]] = []

    def _file(self, trainer) -> Path:
        return Path(self.path or os.path.join(trainer.default_root_dir, "steps.jsonl"))

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every_n_steps == 0:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            ids = [str(i) for i in batch["ids"]] if isinstance(batch, dict) and "ids" in batch else None
            self._pending.append((step, loss.detach() if loss is not None else None, ids))
        every = self.flush_every_n_steps
        if is_logging_step(trainer) if every is None else step % every == 0:
            self.flush(trainer)

    @rank_zero_only
    def flush(self, trainer) -> None:
        """Write the buffered records (their losses read in one transfer)."""
        if not self._pending:
            return
        losses = [loss.float().reshape(()) for _, loss, _ in self._pending if loss is not None]
        values = iter(torch.stack(losses).tolist() if losses else [])
        path = self._file(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            for step, loss, ids in self._pending:
                record = {"step": step, "loss": next(values) if loss is not None else None}
                if ids is not None:
                    record["ids"] = ids
                f.write(json.dumps(record) + "\n")
            f.flush()
        self._pending.clear()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.flush(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self.flush(trainer)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.flush(trainer)
