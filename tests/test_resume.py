"""A killed run, restarted with the same command, continues from its last complete checkpoint with the
same optimizer, scheduler, EMA, RNG and data-loader state: the loss curve matches an uninterrupted run
step for step, and no sample is repeated or skipped. Real subprocesses, real SIGKILLs.

Matching losses alone do not prove a resume (a seeded rerun from scratch reproduces them), so each rerun
must also restore the checkpoint and log its first step right after the checkpoint's step."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import run_main

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 10
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {run}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {run}/checkpoints, every_n_train_steps: 3, save_last: true, save_top_k: 1, monitor: step, mode: max}}
    - class_path: callbacks.rng_state.RNGState
    - class_path: callbacks.nan_guard.NanGuard
    - class_path: callbacks.step_log.StepLog
model:
  class_path: lit_ovis.modules.flow_matching.FlowMatchingModule
  init_args:
    encoders: {{max_sequence_length: 256}}
    optimizer: {{lr: 1.0e-3, warmup_steps: 4}}
    ema: {{enabled: true, decay: 0.9}}
    flow_matching: {{caption_dropout: 0.2}}
    sampling: {{steps: 2, height: 32, width: 32}}
data:
  class_path: data_modules.streaming.LatentDataModule
  init_args: {{root: {data}, batch_size: 4, num_workers: 1, synthetic_samples: 32, synthetic_resolution: 32}}
"""


def run(config: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = run_main("fit", "--config", str(config), *extra, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:])
    return proc


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "steps.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def restored(proc: subprocess.CompletedProcess) -> str | None:
    """The checkpoint Lightning says it restored, or None."""
    for line in (proc.stdout + proc.stderr).splitlines():
        if "Restoring states from the checkpoint path at " in line:
            return line.split(" at ", 1)[1].strip()
    return None


def ckpt_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


def steps(run_dir: Path) -> dict[int, dict]:
    """Last record per step (a resumed run re-logs the steps after its checkpoint)."""
    out = {}
    for line in (run_dir / "steps.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = r
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    data = base / "data"
    cfg = base / "ref.yaml"
    cfg.write_text(CONFIG.format(run=base / "ref", data=data))
    run(cfg)
    return base, data, steps(base / "ref")


@pytest.mark.parametrize("phase,kill_at", [("step", 5), ("save", 6)])
def test_kill_and_rerun_matches_uninterrupted_run(reference, phase, kill_at):
    base, data, ref = reference
    run_dir = base / f"killed_{phase}"
    cfg = base / f"{phase}.yaml"
    cfg.write_text(CONFIG.format(run=run_dir, data=data))
    killed = run(cfg, "--trainer.callbacks+=callbacks.fault_injection.FaultInjector",
                 f"--trainer.callbacks.kill_at_step={kill_at}", f"--trainer.callbacks.phase={phase}", check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]  # really SIGKILLed
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    if phase == "save":
        assert any(n.startswith(".") and ".tmp-" in n for n in ckpts)  # the interrupted write...
        assert "last.ckpt" in ckpts  # ...left the previous checkpoint intact
    saved_at = ckpt_step(run_dir / "checkpoints" / "last.ckpt")
    assert 0 < saved_at < kill_at
    logged_before = len(records(run_dir))
    rerun = run(cfg)  # the same command again: resumes from last.ckpt by default
    assert restored(rerun) == str(run_dir / "checkpoints" / "last.ckpt"), (rerun.stdout + rerun.stderr)[-2000:]
    new = [r["step"] for r in records(run_dir)[logged_before:]]
    assert new == list(range(saved_at + 1, 11))  # continued after the checkpoint, did not start over
    got = steps(run_dir)
    assert sorted(got) == sorted(ref) == list(range(1, 11))
    for step in ref:
        assert got[step]["ids"] == ref[step]["ids"], f"data differs at step {step}"
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5, abs=1e-6), f"loss differs at step {step}"


def test_rerun_of_a_finished_run_resumes_and_ckpt_path_null_starts_fresh(reference, tmp_path):
    base, data, ref = reference
    run_dir = tmp_path / "finished"
    shutil.copytree(base / "ref", run_dir)
    cfg = tmp_path / "finished.yaml"
    cfg.write_text(CONFIG.format(run=run_dir, data=data))
    last = run_dir / "checkpoints" / "last.ckpt"
    # checkpoints every 3 steps, yet `last` holds the final step 10 (callbacks/final_checkpoint.py; Lightning alone
    # left it at step 9, so a finished run lost its last step)
    assert ckpt_step(last) == 10
    assert sorted(p.name for p in last.parent.iterdir() if p.name != "last.ckpt")[-1].endswith("step=9.ckpt")
    logged_before = len(records(run_dir))

    rerun = run(cfg)  # the run is finished: it resumes at its end and trains nothing
    assert restored(rerun) == str(last)
    assert records(run_dir)[logged_before:] == []

    logged_before = len(records(run_dir))
    fresh = run(cfg, "--ckpt_path", "null", "--trainer.max_steps", "2")
    assert restored(fresh) is None
    new = records(run_dir)[logged_before:]
    assert [r["step"] for r in new] == [1, 2]
    assert [r["loss"] for r in new] == pytest.approx([ref[1]["loss"], ref[2]["loss"]], rel=1e-5, abs=1e-6)
