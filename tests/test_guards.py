"""Guards: NaN/Inf steps are skipped, counted and stop the run after too many in a row; a failed
checkpoint write (full disk) keeps the previous checkpoint intact and says so in one line."""

from __future__ import annotations

import errno

import lightning as L
import pytest
import torch

from callbacks.nan_guard import NanGuard, NonFiniteError
from helpers import LatentSet, loader, tiny_flow_module
from lit_ovis.checkpoint_io import AtomicCheckpointIO
from lit_ovis.errors import CheckpointError


class PoisonedBatches(L.Callback):
    """Makes the loss NaN on the chosen global steps."""

    def __init__(self, steps):
        self.steps = set(steps)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in self.steps:
            batch["latents"][0, 0, 0, 0] = float("nan")


def _trainer(tmp_path, steps, callbacks):
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks)


def test_nan_steps_are_skipped_and_counted(tmp_path):
    L.seed_everything(0)
    module = tiny_flow_module()
    guard = NanGuard(max_consecutive=3)
    _trainer(tmp_path, 6, [PoisonedBatches({1, 3}), guard]).fit(module, loader(LatentSet(n=4), batch_size=2))
    assert guard.skipped_total == 2 and guard.consecutive == 0
    assert all(torch.isfinite(p).all() for p in module.backbone.parameters())  # no poisoned update applied


def test_too_many_nan_steps_in_a_row_stop_with_a_clear_message(tmp_path):
    module = tiny_flow_module()
    with pytest.raises(NonFiniteError, match=r"stopping: 3 consecutive steps with NaN/Inf .* lower --model.optimizer.lr"):
        _trainer(tmp_path, 10, [PoisonedBatches(range(10)), NanGuard(max_consecutive=3)]).fit(module, loader(LatentSet(n=4), batch_size=2))


def test_full_disk_keeps_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def full_disk(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError) as err:
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    message = str(err.value)
    assert "No space left on device" in message and "previous checkpoint is intact" in message and "\n" not in message
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind
