"""benchmarks/gpu_check.py: the CPU smoke mode runs every part end to end (a failing measurement is recorded
and the rest go on, GPU-only ones are skipped with their reason), and the guard around each measurement
keeps the run inside its time budget."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_mode_runs_every_part_and_records_a_failure(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # tiny ops: one thread is faster
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--out-dir", str(out),
                           "--backends", "native", "no_such_backend"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "gpu_check.json").read_text())
    by = {(r["part"], r["name"]): r for r in data["results"]}
    assert data["mode"] == "smoke" and data["elapsed_s"] < data["budget_s"]

    syncs = by["host_syncs", "configs/smoke.yaml training"]
    assert syncs["status"] == "ok" and syncs["metrics"]["plain_steps"] > 0
    assert syncs["metrics"]["max_reads_per_plain_step"] == 0  # item 3's target, on the demo's own code path

    for res in (64, 128):
        m = by["training", f"{res}² native eager"]["metrics"]
        assert m["step_s"] > 0 and m["tflops"] > 0 and m["estimate_gib"] > 0 and m["mfu"] is None  # no peak on CPU
        failed = by["training", f"{res}² no_such_backend eager"]
        assert failed["status"] == "failed" and "no_such_backend" in failed["error"]
        assert by["training", f"{res}² native compiled"]["status"] == "skipped"
    order = [r["name"] for r in data["results"]]
    assert order.index("128² native eager") < order.index("64² no_such_backend eager") < order.index("eager")  # went on after it

    sample = by["sampling", "eager"]
    assert sample["status"] == "ok" and sample["metrics"]["ours_s"] > 0 and sample["metrics"]["ours_over_pipeline"] > 0
    assert by["sampling", "compiled"]["status"] == "skipped" and "GPU" in by["sampling", "compiled"]["reason"]

    md = (out / "gpu_check.md").read_text()
    assert "| 64 | 2 | native | no |" in md and "| eager | tiny | 64² | 3 |" in md
    assert "no_such_backend eager: failed" in md and "| plain |" in md


def test_measurements_are_guarded_and_kept_inside_the_budget(tmp_path):
    gc = load_gpu_check()
    now = [0.0]
    check = gc.Check(tmp_path, budget_s=100.0, meta={"device": "test"}, clock=lambda: now[0])

    def slow_ok():
        now[0] += 30.0
        return {"x": 1}

    def broken():
        raise RuntimeError("kernel not found\nsecond line")

    assert check.run("p", "first", slow_ok, need_s=10) == {"x": 1}
    assert json.loads((tmp_path / "gpu_check.json").read_text())["results"][0]["status"] == "ok"  # written at once
    assert check.run("p", "broken", broken, need_s=10) is None
    now[0] = 95.0
    assert check.run("p", "too big", slow_ok, need_s=10) is None  # 5 s left: not started
    results = {r["name"]: r for r in json.loads((tmp_path / "gpu_check.json").read_text())["results"]}
    assert results["broken"]["status"] == "failed" and results["broken"]["error"] == "RuntimeError: kernel not found"
    assert results["too big"]["status"] == "skipped" and results["too big"]["reason"].startswith("time budget: 5 s left")
    assert "p: broken: failed: RuntimeError: kernel not found" in (tmp_path / "gpu_check.md").read_text()


def test_a_measurement_that_overruns_the_budget_is_stopped():
    gc = load_gpu_check()
    t0 = time.monotonic()
    with pytest.raises(gc.MeasurementTimeout):
        with gc.time_limit(0.5):
            while True:
                time.sleep(0.01)
    assert time.monotonic() - t0 < 5
