"""Checkpoint-and-requeue on SLURM's warning signal, safely under DDP/FSDP.

Lightning's own SLURM handler saves inside the signal handler; with several ranks one of them can be
blocked in a collective when the signal lands, and the save's barrier then deadlocks the job. Here the
handler only raises a flag; at the next batch boundary the ranks agree on it (one tiny all-reduce), all
save `hpc_ckpt_N.ckpt` together, and rank 0 asks SLURM to requeue the job. The requeued job reruns the
same command, which resumes from that checkpoint. Use with `SLURMEnvironment(auto_requeue=False)`
(`lit-ovis submit` sets both).
"""

from __future__ import annotations

import os
import signal
import subprocess

import lightning as L
import torch


class RequeueOnSignal(L.Callback):
    def __init__(self, signum: str = "SIGUSR1", requeue: bool = True):
        self.signum = getattr(signal, signum)
        self.requeue = requeue
        self._flag = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        signal.signal(self.signum, self._handler)

    def _handler(self, signum, frame) -> None:
        self._flag = True

    def _agreed(self, trainer) -> bool:
        flag = torch.tensor(float(self._flag), device=trainer.strategy.root_device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._agreed(trainer):
            return
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        trainer.save_checkpoint(path)
        job = os.environ.get("SLURM_JOB_ID")
        if trainer.is_global_zero and self.requeue and job:
            array = os.environ.get("SLURM_ARRAY_JOB_ID")
            job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else job
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            print(f"saved {path}; requeue job {job}: {'ok' if result.returncode == 0 else result.stderr.strip()}", flush=True)
        self._flag = False
        trainer.should_stop = True
