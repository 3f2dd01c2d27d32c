"""Every row of docs/bad-command-lines.md: the command line fails with exit code 2, its first stderr line is
exactly the documented `error:` line, at most 3 stderr lines, no traceback, within seconds. Rows run in
this process (parse-time failures build no model), and two run as real subprocesses to count every line
a user sees."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| `` (.+?) `` \| `` (.+?) `` \| (.*?) \|$")


def table() -> list[tuple[str, str, str]]:
    rows = [ROW.match(line) for line in (ROOT / "docs" / "bad-command-lines.md").read_text(encoding="utf-8").splitlines()]
    return [m.groups() for m in rows if m]


def test_the_table_has_at_least_25_command_lines():
    assert len(table()) >= 25


def run_in_process(command: str) -> tuple[int, list[str], float]:
    import data_modules.streaming  # noqa: F401 - imported once up front: the clock measures the failure, not imports
    import lit_ovis.modules.flow_matching  # noqa: F401
    from lit_ovis.__main__ import main as lit_ovis_main
    from lit_ovis.cli.lightning_cli import run

    argv = shlex.split(command)
    err = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            code = run(argv[2:]) if argv[:2] == ["python", "main.py"] else lit_ovis_main(argv[1:])
        except SystemExit as exit_:
            code = exit_.code
    return code, err.getvalue().strip().splitlines(), time.perf_counter() - start


@pytest.mark.parametrize("command,error,only", table(), ids=[row[0].split(" ", 2)[-1][:60] for row in table()])
def test_bad_command_line_fails_fast_with_one_line(command, error, only, monkeypatch):
    if only == "without a GPU" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.chdir(ROOT)
    code, lines, seconds = run_in_process(command)
    assert code == 2, lines
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == [error], lines
    assert len(lines) <= 3 and not any("Traceback" in line for line in lines), lines
    assert seconds < 15, f"{seconds:.1f} s"
    assert not (ROOT / "out").exists()  # failed before any work


@pytest.mark.parametrize("option", ["--trainer.max_stpes", "--trainer.gradient_clip_algorithm"])  # a typo; Lightning's refusal
def test_what_a_user_sees_in_a_terminal(option):
    command, error, _ = next(row for row in table() if option in row[0])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and error in lines and len(lines) <= 3, proc.stderr[-2000:]


def test_user_message_finds_the_line_inside_wrappers():
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from lit_ovis.errors import ConfigError, DataError, user_message

    try:  # what jsonargparse does with an error raised in a data-module constructor
        try:
            raise ConfigError("--data.val_samples_per_bucket must be >= 0 (got -1)")
        except ConfigError as inner:
            raise ValueError("Does not validate against any of the Union subtypes\nErrors:\n  - ...") from inner
    except ValueError as wrapped:
        assert user_message(wrapped) == "--data.val_samples_per_bucket must be >= 0 (got -1)"
    worker = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                       '  File "x.py", line 1, in f\nlit_ovis.errors.DataError: data/x/64/64x64: no readable record left in this bucket')
    assert user_message(worker) == "data/x/64/64x64: no readable record left in this bucket"
    assert user_message(MisconfigurationException("`val_check_interval` (5) must be less than or equal to the number of the "
                                                  "training batches (3).")).startswith("--trainer.val_check_interval: Lightning refused")
    assert user_message(RuntimeError("DataLoader timed out after 7 seconds")).startswith(
        "a data-loader worker produced no batch for 7 s (--data.worker_timeout_s)")
    assert user_message(RuntimeError("a bug")) is None  # bugs keep their traceback
