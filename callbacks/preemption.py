"""Checkpoint-and-requeue on SLURM's warning signal, safely under DDP/FSDP.

Lightning's own SLURM handler saves inside the signal handler; with several ranks one of them can be
blocked in a collective when the signal lands, and the save's barrier then deadlocks the job. Here the
handler only raises a flag; every `check_every_n_steps` training batches (optimizer steps without
gradient accumulation; one GRPO iteration each), and at the end of every validation run, the ranks
agree on it (one tiny all-reduce and one host read, so the check costs nothing
on the other steps), all save `hpc_ckpt_N.ckpt` together, and rank 0 asks SLURM to requeue the job. The
requeued job reruns the same command, which resumes from that checkpoint. Use with
`SLURMEnvironment(auto_requeue=False)` (`lit-ovis submit` sets both).

Lead time: SLURM's `--signal=SIGUSR1@SECONDS` (`lit-ovis submit --signal-seconds`) must exceed
`check_every_n_steps` steps, plus a validation run if one can start, plus one checkpoint save; otherwise
the job is killed at its time limit first and loses the steps since the last periodic checkpoint.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn

from lit_ovis.errors import ConfigError


def next_hpc_path(root: str | os.PathLike) -> str:
    """`hpc_ckpt_{N+1}.ckpt` after the highest complete `hpc_ckpt_N.ckpt` in `root`. Unlike Lightning's
    `hpc_save_path`, other files that merely contain `ckpt_` (temp files) cannot inflate N."""
    numbers = [int(m.group(1)) for p in Path(root).glob("hpc_ckpt_*") if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))]
    return os.path.join(root, f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt")


class RequeueOnSignal(L.Callback):
    def __init__(self, signum: str = "SIGUSR1", requeue: bool = True, check_every_n_steps: int = 10):
        if check_every_n_steps < 1:
            raise ConfigError(f"RequeueOnSignal.check_every_n_steps must be >= 1 (got {check_every_n_steps})")
        self.signum = getattr(signal, signum)
        self.requeue = requeue
        self.check_every_n_steps = check_every_n_steps
        self._flag = False
        self._batches = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Stays installed until the process exits: a late signal must not kill a job that is shutting down.
        signal.signal(self.signum, self._handler)

    def _handler(self, signum, frame) -> None:
        self._flag = True

    def _agreed(self, trainer) -> bool:
        flag = torch.tensor(float(self._flag), device=trainer.strategy.root_device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def _save_and_requeue(self, trainer) -> None:
        path = next_hpc_path(trainer.default_root_dir)
        trainer.save_checkpoint(path)
        job = os.environ.get("SLURM_JOB_ID")
        if trainer.is_global_zero and self.requeue and job:
            array = os.environ.get("SLURM_ARRAY_JOB_ID")
            job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else job
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            print(f"saved {path}; requeue job {job}: {'ok' if result.returncode == 0 else result.stderr.strip()}", flush=True)
        self._flag = False
        trainer.should_stop = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Ranks train in lockstep, so every rank counts the same batches and enters the collective together
        # (a batch count, not global_step: a GRPO iteration moves global_step by several steps at once).
        self._batches += 1
        if self._batches % self.check_every_n_steps or not self._agreed(trainer):
            return
        self._save_and_requeue(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        # A long validation run can eat the whole lead time: honour the signal as soon as it ends.
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING or not self._agreed(trainer):
            return
        self._save_and_requeue(trainer)
