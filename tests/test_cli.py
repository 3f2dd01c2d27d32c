"""LightningCLI: overrides reach the code, --print_config works, bad configs fail fast in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def main_py(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_print_config_shows_overrides():
    proc = main_py("fit", "--config", "configs/demo.yaml", "--model.optimizer.lr", "1e-5", "--trainer.max_steps", "100", "--print_config")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "lr: 1.0e-05" in proc.stdout and "max_steps: 100" in proc.stdout


def test_override_changes_the_value_used(tmp_path):
    run = tmp_path / "run"
    proc = main_py(
        "fit", "--config", "configs/demo.yaml", "--model.optimizer.lr", "3.5e-4", "--model.optimizer.warmup_steps", "0",
        "--trainer.max_steps", "2", f"--trainer.default_root_dir={run}", "--trainer.logger=false",
        "--trainer.callbacks=lightning.pytorch.callbacks.ModelCheckpoint", f"--trainer.callbacks.dirpath={run}/ckpt",
        f"--data.root={tmp_path}/data", "--data.synthetic_samples=16", "--data.synthetic_resolution=32", "--data.batch_size=4",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(next((run / "ckpt").glob("*.ckpt")), map_location="cpu", weights_only=False)
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(3.5e-4)
    assert ckpt["hyper_parameters"]["optimizer"]["lr"] == pytest.approx(3.5e-4)


@pytest.mark.parametrize(
    "override,message",
    [
        ("--model.backbone.preset=huge", "unknown preset 'huge'"),
        ("--model.sampling.height=100", "not a multiple of 16"),
        ("--data.root=/nonexistent/prepared", "does not exist"),
        ("--model.optimizer.lr=-1", "must be > 0"),
    ],
)
def test_bad_config_fails_fast_with_one_line(override, message):
    extra = ["--data.synthetic_samples=0"] if "data.root" in override else []
    proc = main_py("fit", "--config", "configs/demo.yaml", override, *extra, timeout=120)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
