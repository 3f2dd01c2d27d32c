"""configs/demo.yaml's training reads no device value on the host between logging steps: every such read
(`aten::_local_scalar_dense`: `.item()`, `float(t)`, `bool(t)`) makes the host wait for the GPU's whole queue.
The NaN guard decides skips on the device, Lightning gets no prog_bar step metrics to convert, and the
progress display, step log and throughput logger read only on logging steps (callbacks.host_reads counts)."""

from __future__ import annotations

from helpers import demo_config_in
from lit_ovis.cli.lightning_cli import run


def test_demo_training_reads_the_device_only_on_logging_steps(tmp_path, capsys):
    config = demo_config_in(tmp_path, synthetic_samples=64)  # 7 batches an epoch: epoch ends fall inside the run
    cli = run(["fit", "--config", str(config), "--trainer.max_steps", "25", "--ckpt_path", "null",
               "--trainer.callbacks+=callbacks.host_reads.HostReadCounter", "--trainer.callbacks.report=false"])
    trainer = cli.trainer
    counter = next(c for c in trainer.callbacks if type(c).__name__ == "HostReadCounter")
    assert trainer.global_step == 25 and trainer.log_every_n_steps == 10
    kinds = {step: counter.kind(step) for step in counter.steps()}
    assert [s for s, k in kinds.items() if k == "logging"] == [9, 19]  # global_step 10 and 20 after the update
    plain = [s for s, k in kinds.items() if k in ("plain", "first")]
    assert len(plain) >= 15
    assert {s: counter.reads[s] for s in plain if counter.reads[s]} == {}  # not one read on those steps
    assert all(counter.reads[s] > 0 for s in (9, 19))  # the counter does see the logging steps' reads
    assert {"NanGuard", "ThroughputLogger", "LearningRateMonitor", "StepProgressLog"} <= {type(c).__name__ for c in trainer.callbacks}
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in lines] == ["step 10/25", "step 20/25"]  # stdout is not a terminal here
