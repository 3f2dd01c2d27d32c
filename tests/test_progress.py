"""Progress output: with stdout redirected to a file (logs, SLURM) a run prints one line per logging interval
(step/total, loss, samples/s, elapsed, ETA) and a closing line; on a terminal it gets the rich step bar."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

from callbacks.progress import StepProgressBar, StepProgressLog, batch_items, progress_for_stdout
from helpers import demo_config_in

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^step (\d+)/20 \| loss [0-9.e+-]+ \|.* \| [0-9.e+-]+ samples/s \| elapsed \d+:\d\d:\d\d \| ETA \d+:\d\d:\d\d$")


def test_redirected_stdout_gets_a_progress_line_per_logging_interval(tmp_path):
    config = demo_config_in(tmp_path, synthetic_samples=16, synthetic_resolution=32, batch_size=4)
    log = tmp_path / "log.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # tiny ops: one thread is faster
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "fit", "--config", str(config), "--ckpt_path", "null",
                               "--trainer.max_steps", "20", "--trainer.log_every_n_steps", "5"],
                              cwd=ROOT, env=env, stdout=out, stderr=subprocess.PIPE, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = log.read_text().splitlines()
    steps = [int(m.group(1)) for m in map(LINE.match, lines) if m]
    assert steps == [5, 10, 15, 20], "\n".join(lines[-30:])
    assert any(re.match(r"^done: step 20/20 in \d+:\d\d:\d\d$", line) for line in lines)


def test_the_display_fits_the_stream():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert isinstance(progress_for_stdout(Terminal()), StepProgressBar)
    assert isinstance(progress_for_stdout(io.StringIO()), StepProgressLog)


def test_batch_items_counts_latents_pairs_and_prompts():
    import torch

    assert batch_items({"ids": [1, 2, 3], "latents": torch.zeros(3, 16, 4, 4)}) == 3
    assert batch_items({"latents_w": torch.zeros(2, 16, 4, 4), "latents_l": torch.zeros(2, 16, 4, 4)}) == 2
    assert batch_items({"prompts": ["a", "b"]}) == 2
