"""An append-only JSON-lines record of every optimizer step: step, loss and the sample ids it trained on.
Audits that a resumed run neither repeated nor skipped data, and makes loss curves easy to diff."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only


class StepLog(L.Callback):
    def __init__(self, path: str | None = None, every_n_steps: int = 1):
        self.path = path
        self.every_n_steps = every_n_steps

    def _file(self, trainer) -> Path:
        return Path(self.path or os.path.join(trainer.default_root_dir, "steps.jsonl"))

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every_n_steps:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        record = {"step": step, "loss": float(loss.detach()) if loss is not None else None}
        if isinstance(batch, dict) and "ids" in batch:
            record["ids"] = [str(i) for i in batch["ids"]]
        path = self._file(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
