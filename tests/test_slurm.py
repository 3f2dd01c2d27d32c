"""A real SLURM job (localhost slurmctld + slurmd, `scripts/setup_slurm_localhost.sh`): a 2-task CPU
training job rendered by `lit-ovis submit` is signalled like a job near its time limit; Lightning saves a
checkpoint and requeues it, and the requeued job resumes from that checkpoint and finishes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slurm, pytest.mark.slow]

CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  max_steps: 40
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {run}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {run}/checkpoints, every_n_train_steps: 20, save_last: true, save_top_k: 1, monitor: step, mode: max}}
    - class_path: callbacks.rng_state.RNGState
    - class_path: callbacks.step_log.StepLog
      init_args: {{flush_every_n_steps: 1}}  # written every step: the test watches the file to time its signal
model:
  class_path: lit_ovis.modules.flow_matching.FlowMatchingModule
  init_args:
    encoders: {{max_sequence_length: 256}}
    sampling: {{steps: 2, height: 32, width: 32}}
data:
  class_path: data_modules.streaming.LatentDataModule
  init_args: {{root: {data}, batch_size: 2, num_workers: 0, synthetic_samples: 32, synthetic_resolution: 32}}
"""


def slurm_up() -> bool:
    if shutil.which("sbatch") is None:
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True, text=True).returncode == 0


@pytest.fixture(scope="module")
def cluster():
    if not slurm_up():
        setup = ROOT / "scripts" / "setup_slurm_localhost.sh"
        proc = subprocess.run(["bash", str(setup)], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or not slurm_up():
            pytest.skip(f"no local SLURM (run scripts/setup_slurm_localhost.sh as root): {proc.stderr[-300:]}")


def job_state(job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    for field in out.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return "GONE"


def steps_logged(run: Path) -> list[int]:
    path = run / "steps.jsonl"
    if not path.exists():
        return []
    return [json.loads(l)["step"] for l in path.read_text().splitlines() if l.strip()]


def test_requeued_job_resumes_from_its_checkpoint(cluster, tmp_path):
    run, data = tmp_path / "run", tmp_path / "data"
    cfg = tmp_path / "job.yaml"
    cfg.write_text(CONFIG.format(run=run, data=data))
    # Build the data once outside the job, so both tasks find it ready.
    sys.path.insert(0, str(ROOT))
    from data_modules.streaming import ensure_synthetic_dataset

    ensure_synthetic_dataset(str(data), 32, 32)
    out = subprocess.run(
        [sys.executable, "-m", "lit_ovis", "submit", "--config", str(cfg), "--nodes", "1", "--gpus-per-node", "2", "--cpu",
         "--cpus-per-task", "1", "--time", "00:15:00", "--job-name", "litovis-test", "--log-dir", str(tmp_path / "logs"),
         "--env", "HF_HUB_OFFLINE=1", "--env", "OMP_NUM_THREADS=1", "--env", f"PYTHONPATH={ROOT}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,  # submit only writes and queues the script; the import alone is slow on a loaded machine
    )
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip().splitlines()[-1]
    try:
        deadline = time.time() + 300
        while len(steps_logged(run)) < 8:  # let it train a few steps past start-up
            assert time.time() < deadline, (tmp_path / "logs").glob("*")
            assert job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), job_state(job)
            time.sleep(2)
        # What SLURM does `--signal` seconds before the time limit: SIGUSR1 to the job's tasks.
        subprocess.run(["scancel", "--signal=USR1", job], check=True)
        deadline = time.time() + 600
        released = False
        while job_state(job) not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "GONE"):
            assert time.time() < deadline, "job did not finish"
            if not released and job_state(job) == "PENDING":
                # SLURM holds a requeued job ~2 minutes before it is eligible again; on this idle test
                # cluster, make it eligible now (what a free node would do anyway).
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
                released = True
            time.sleep(2)
        logs = "\n".join(p.read_text() for p in (tmp_path / "logs").glob("*.out"))
        errs = "\n".join(p.read_text() for p in (tmp_path / "logs").glob("*.err"))
        assert job_state(job) == "COMPLETED", errs[-2000:]
        assert "restart count 1" in logs, logs  # the batch script ran a second time: requeued
        hpc = sorted(p.name for p in run.iterdir() if p.name.startswith("hpc_ckpt_"))
        assert hpc == ["hpc_ckpt_1.ckpt"], list(run.iterdir())
        saved_at = torch.load(run / hpc[0], map_location="cpu", weights_only=False)["global_step"]
        assert saved_at % 10 == 0 and 0 < saved_at < 40  # RequeueOnSignal checks every 10 steps (submit's default)
        assert f"Restoring states from the checkpoint path at {run}/" in logs + errs  # the rerun resumed
        steps = steps_logged(run)
        assert steps.count(1) == 1, "the requeued job started over instead of resuming"
        # every step was trained exactly once and in order, across the two runs of the job: the first run
        # stopped right after its checkpoint, the second continued from the step after it
        assert steps == list(range(1, 41))
    finally:
        subprocess.run(["scancel", job], capture_output=True)
