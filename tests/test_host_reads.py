"""configs/smoke.yaml's training reads no device value on the host between logging steps: every such read
(`aten::_local_scalar_dense`: `.item()`, `float(t)`, `bool(t)`) makes the host wait for the GPU's whole queue.
The NaN guard decides skips on the device, Lightning gets no prog_bar step metrics to convert, and the
progress display, step log and throughput logger read only on logging steps (callbacks.host_reads counts)."""

from __future__ import annotations

from helpers import demo_config_in
from lit_ovis.cli.lightning_cli import run


def test_demo_training_reads_the_device_only_on_logging_steps(tmp_path, capsys, one_thread):  # tiny ops: 1 thread is 4x faster
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


def test_step_log_writes_every_step_but_reads_losses_only_on_logging_steps(tmp_path):
    import json

    import lightning as L

    from callbacks.step_log import StepLog
    from helpers import LatentSet, loader, tiny_flow_module

    path = tmp_path / "steps.jsonl"

    class Lines(L.Callback):
        seen: list[int] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.seen.append(len(path.read_text().splitlines()) if path.exists() else 0)

    L.seed_everything(0)
    trainer = L.Trainer(max_steps=7, log_every_n_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[StepLog(str(path)), probe := Lines()])
    trainer.fit(tiny_flow_module(), loader(LatentSet(n=4), batch_size=2))
    assert probe.seen == [0, 0, 0, 3, 3, 3, 6]  # written in one go on logging steps (global_step 3 and 6)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 8)) and all(r["loss"] > 0 for r in records)  # the rest at the end
    assert len(records[0]["ids"]) == 2
