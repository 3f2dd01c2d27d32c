"""Guards: NaN/Inf steps are skipped (weights, Adam moments, LR schedule and EMA untouched), counted and
stop the run after too many in a row; a failed checkpoint write (a real full disk) keeps the previous
checkpoint intact and says so in one line; checkpoint temp files never confuse SLURM checkpoint numbering
and are cleaned up; the SLURM warning signal is honoured every N steps and at validation end."""

from __future__ import annotations

import errno
import os
import signal
import time

import lightning as L
import pytest
import torch

from callbacks.nan_guard import NanGuard, NonFiniteError
from callbacks.preemption import RequeueOnSignal, next_hpc_path
from helpers import LatentSet, loader, mounted_tmpfs, tiny_flow_module, tiny_trainer
from lit_ovis.checkpoint_io import AtomicCheckpointIO, temp_path
from lit_ovis.errors import CheckpointError, UserError
from lit_ovis.modules.config import EMAConfig


class PoisonedBatches(L.Callback):
    """Makes the loss NaN on the chosen global steps."""

    def __init__(self, steps):
        self.steps = set(steps)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in self.steps:
            batch["latents"][0, 0, 0, 0] = float("nan")


class PoisonedGrads(L.Callback):
    """NaN gradients with a finite loss on the chosen global steps."""

    def __init__(self, steps):
        self.steps = set(steps)

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step in self.steps:
            next(p for p in pl_module.parameters() if p.grad is not None).grad[0] = float("nan")


def poison_loss(module, steps):
    """A NaN loss whose gradients are finite (a NaN constant added to the loss has no gradient)."""
    train = module.training_step

    def step(batch, batch_idx):
        loss = train(batch, batch_idx)
        return loss + float("nan") if module.global_step in steps else loss

    module.training_step = step
    return module


def _trainer(tmp_path, steps, callbacks, **kw):
    return tiny_trainer(steps, default_root_dir=tmp_path, callbacks=callbacks, **kw)


def test_nan_steps_are_skipped_and_counted(tmp_path):
    L.seed_everything(0)
    module = tiny_flow_module()
    guard = NanGuard(max_consecutive=3)
    _trainer(tmp_path, 6, [PoisonedBatches({1, 3}), guard]).fit(module, loader(LatentSet(n=4), batch_size=2))
    assert guard.skipped_total == 2 and guard.consecutive == 0
    assert all(torch.isfinite(p).all() for p in module.backbone.parameters())  # no poisoned update applied


class Snapshot(L.Callback):
    """Everything a step carries forward, at the start of every batch."""

    def __init__(self):
        self.at: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        opt = trainer.optimizers[0]
        moments = [s[k].clone() for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq", "step")]
        self.at[trainer.global_step] = {
            "weights": [p.detach().clone() for p in pl_module.backbone.parameters()], "moments": moments,
            "lr": opt.param_groups[0]["lr"], "sched": trainer.lr_scheduler_configs[0].scheduler.last_epoch,
            "ema": [b.clone() for b in pl_module.ema.buffers()],
        }


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("check_every", [1, None])
@pytest.mark.parametrize("poison", ["loss", "grads"])
def test_a_skipped_step_changes_no_weight_moment_lr_or_ema(tmp_path, poison, check_every):
    """Weights, moments and EMA are gated on the device, so they are exact at once; the LR schedule is rewound
    when the host reads the guard's counters: every step with check_every 1, else at the next check (here the
    end of training, the logging interval being 50)."""
    L.seed_everything(0)
    module = tiny_flow_module(ema=EMAConfig(enabled=True, decay=0.5))  # warm-up 5: the LR moves every step
    callbacks = [NanGuard(max_consecutive=3, check_every_n_steps=check_every), snap := Snapshot()]
    if poison == "loss":
        poison_loss(module, {3})
    else:
        callbacks.insert(0, PoisonedGrads({3}))
    trainer = _trainer(tmp_path, 6, callbacks)
    trainer.fit(module, loader(LatentSet(n=4), batch_size=2))
    assert callbacks[-2].skipped_total == 1
    before, after, later = snap.at[3], snap.at[4], snap.at[5]
    for key in ("weights", "moments", "ema"):
        assert _same(before[key], after[key]), f"the skipped step changed the {key}"
        assert not _same(after[key], later[key]), f"a good step must change the {key}"  # the probe sees changes
    if check_every == 1:
        assert after["sched"] == before["sched"] and after["lr"] == before["lr"]  # schedule did not advance
        assert later["sched"] == after["sched"] + 1 and later["lr"] > after["lr"]
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.last_epoch == snap.at[0]["sched"] + 5  # 6 optimizer steps, 1 skipped: the schedule took 5
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(sched.base_lrs[0] * min(1.0, (5 + 1) / 5))


class SeenSkips(L.Callback):
    def __init__(self, guard):
        self.guard, self.seen = guard, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(self.guard.skipped_total)


def test_skips_are_decided_on_the_device_and_read_at_the_check_interval(tmp_path):
    """No host read between checks: a skip at step 1 becomes visible on the host at the check after step 4."""
    L.seed_everything(0)
    module = tiny_flow_module()
    guard = NanGuard(max_consecutive=3, check_every_n_steps=4)
    probe = SeenSkips(guard)
    _trainer(tmp_path, 6, [PoisonedBatches({1}), guard, probe]).fit(module, loader(LatentSet(n=4), batch_size=2))
    assert probe.seen == [0, 0, 0, 0, 1, 1] and guard.skipped_total == 1
    assert all(torch.isfinite(p).all() for p in module.backbone.parameters())


def test_too_many_nan_steps_in_a_row_stop_with_a_clear_message(tmp_path):
    module = tiny_flow_module()
    with pytest.raises(NonFiniteError, match=r"stopping: 3 consecutive steps with NaN/Inf .* lower --model.optimizer.lr") as err:
        _trainer(tmp_path, 10, [PoisonedBatches(range(10)), NanGuard(max_consecutive=3)]).fit(module, loader(LatentSet(n=4), batch_size=2))
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)  # the CLI prints it as one line


# ------------------------------------------------------------------------------------- checkpoint writes
def test_full_disk_keeps_previous_checkpoint(tmp_path, monkeypatch):
    """ENOSPC raised straight from the write (deterministic, no mount needed)."""
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
    assert "No space left on device" in message and "previous checkpoint last.ckpt is intact" in message and "\n" not in message
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 1 MiB file system that fills up."""
    with mounted_tmpfs(tmp_path / "tmpfs", "1m") as mnt:
        yield mnt


def test_real_full_disk_keeps_previous_checkpoint_byte_for_byte(small_tmpfs):
    io = AtomicCheckpointIO()
    path = small_tmpfs / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.arange(100_000, dtype=torch.float32)}, path)  # 400 kB: fits
    first = path.read_bytes()
    with pytest.raises(CheckpointError) as err:  # 800 kB next to the old 400 kB in 1 MiB: does not fit
        io.save_checkpoint({"step": 2, "w": torch.zeros(200_000)}, path)
    message = str(err.value)
    assert "\n" not in message and "No space left on device" in message
    assert "previous checkpoint last.ckpt is intact" in message and "free disk space" in message
    assert path.read_bytes() == first
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["last.ckpt"]  # the temp file was removed


def test_temp_files_do_not_inflate_slurm_checkpoint_numbers(tmp_path):
    from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector

    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, tmp_path / "hpc_ckpt_2.ckpt")
    # a write of the next SLURM checkpoint killed half-way leaves its temp file behind
    leftover = temp_path(tmp_path / "hpc_ckpt_3.ckpt")
    leftover.write_bytes(b"partial")
    assert "ckpt_" not in leftover.name
    assert _CheckpointConnector.hpc_save_path(tmp_path).endswith("hpc_ckpt_3.ckpt")  # Lightning's own numbering
    # a leftover of the old naming (`.hpc_ckpt_2.ckpt.tmp-4711`) fools Lightning but not ours
    (tmp_path / ".hpc_ckpt_2.ckpt.tmp-4711").write_bytes(b"partial")
    assert next_hpc_path(tmp_path).endswith("hpc_ckpt_3.ckpt")


def test_save_removes_stale_temps_and_older_slurm_checkpoints(tmp_path):
    io = AtomicCheckpointIO()
    stale = [tmp_path / ".last.ckpt.tmp-123", tmp_path / ".hpc_ckpt_1.ckpt.tmp-4711"]  # killed earlier writes
    for p in stale:
        p.write_bytes(b"partial")
        os.utime(p, (time.time() - 3600, time.time() - 3600))
    live = tmp_path / ".epoch=0-step=9.ckpt.tmp-999"  # another process is writing this one right now
    live.write_bytes(b"partial")
    os.utime(live, (time.time() + 3600, time.time() + 3600))
    sharded_tmp = tmp_path / ".step.ckpt.tmp"  # the sharded strategy's own temp directory
    sharded_tmp.mkdir()
    io.save_checkpoint({"step": 1}, tmp_path / "last.ckpt")
    assert not any(p.exists() for p in stale) and live.exists() and sharded_tmp.exists()

    io.save_checkpoint({"step": 1}, tmp_path / "hpc_ckpt_1.ckpt")
    io.save_checkpoint({"step": 2}, tmp_path / "hpc_ckpt_2.ckpt")
    io.save_checkpoint({"step": 3}, tmp_path / "hpc_ckpt_10.ckpt")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert [n for n in names if n.startswith("hpc_ckpt_")] == ["hpc_ckpt_10.ckpt"]  # newest kept (numeric, not lexical)
    assert "last.ckpt" in names
    assert torch.load(tmp_path / "hpc_ckpt_10.ckpt", weights_only=True)["step"] == 3


def test_corrupt_checkpoint_load_is_one_line(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"step": 1}, good)
    data = bytearray(good.read_bytes())
    pkl = data.find(b"data.pkl") + 200  # inside the pickle record, the zip directory stays intact
    data[pkl: pkl + 16] = b"\xff" * 16
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="bad.ckpt' is corrupt") as err:
        AtomicCheckpointIO().load_checkpoint(bad)
    assert "\n" not in str(err.value)


def test_resume_skips_a_damaged_newest_checkpoint(tmp_path):
    from lit_ovis.resume import resolve_ckpt_path

    older = tmp_path / "epoch=0-step=3.ckpt"
    torch.save({"step": 3, "w": torch.zeros(1000)}, older)
    os.utime(older, (time.time() - 60, time.time() - 60))
    last = tmp_path / "last.ckpt"
    torch.save({"step": 6, "w": torch.zeros(1000)}, last)
    last.write_bytes(last.read_bytes()[:2000])  # e.g. a disk fault or a copy cut short
    (tmp_path / temp_path(tmp_path / "last.ckpt").name).write_bytes(b"partial")  # and a killed write's temp
    with pytest.warns(UserWarning, match="skipping .*last.ckpt: not a complete checkpoint"):
        assert resolve_ckpt_path(tmp_path) == str(older)


# -------------------------------------------------------------------------------------------- preemption
class SignalAt(L.Callback):
    """Sends this process SLURM's warning signal at a global step or during the first validation."""

    def __init__(self, step: int = -1, in_validation: bool = False):
        self.step, self.in_validation = step, in_validation

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self.in_validation and not trainer.sanity_checking:
            self.in_validation = False
            os.kill(os.getpid(), signal.SIGUSR1)


class CountingRequeue(RequeueOnSignal):
    def __init__(self, **kw):
        super().__init__(requeue=False, **kw)
        self.checks = 0

    def _agreed(self, trainer) -> bool:
        self.checks += 1
        return super()._agreed(trainer)


@pytest.fixture
def restore_sigusr1():
    previous = signal.getsignal(signal.SIGUSR1)
    yield
    signal.signal(signal.SIGUSR1, previous)


def test_signal_is_checked_every_n_steps_then_checkpointed(tmp_path, restore_sigusr1):
    requeue = CountingRequeue(check_every_n_steps=3)
    trainer = _trainer(tmp_path, 20, [SignalAt(step=4), requeue])
    trainer.fit(tiny_flow_module(), loader(LatentSet(n=4), batch_size=2))
    assert requeue.checks == 2  # steps 3 and 6 only: no host sync on the other steps
    assert trainer.global_step == 6 and trainer.should_stop
    assert sorted(p.name for p in tmp_path.glob("hpc_ckpt_*")) == ["hpc_ckpt_1.ckpt"]
    assert torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=False)["global_step"] == 6


def test_signal_during_validation_is_honoured_at_validation_end(tmp_path, restore_sigusr1):
    requeue = CountingRequeue(check_every_n_steps=100)
    trainer = _trainer(tmp_path, 20, [SignalAt(in_validation=True), requeue], val_check_interval=2, limit_val_batches=1,
                       num_sanity_val_steps=0)
    data = loader(LatentSet(n=8), batch_size=2)
    trainer.fit(tiny_flow_module(), data, loader(LatentSet(n=2), batch_size=2))
    assert trainer.global_step == 2  # stopped right after the first validation, not 100 steps later
    assert torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=False)["global_step"] == 2


def test_check_every_n_steps_must_be_positive():
    with pytest.raises(UserError, match="check_every_n_steps must be >= 1"):
        RequeueOnSignal(check_every_n_steps=0)
