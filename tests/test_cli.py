"""LightningCLI: overrides reach the code, --print_config works, bad configs, a missing or corrupt
--ckpt_path, a diverged run and a full disk each end in one `error:` line (no traceback)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from helpers import run_main
from lit_ovis.cli.lightning_cli import run
from lit_ovis.errors import ConfigError
from lit_ovis.preflight import check_config

ROOT = Path(__file__).resolve().parents[1]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.strip().splitlines() if line.startswith("error:")]


def test_print_config_shows_overrides():
    proc = run_main("fit", "--config", "configs/smoke.yaml", "--model.optimizer.lr", "1e-5", "--trainer.max_steps", "100", "--print_config")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "lr: 1.0e-05" in proc.stdout and "max_steps: 100" in proc.stdout
    assert "\nckpt_path: last\n" in proc.stdout  # a rerun resumes by default


def test_override_changes_the_value_used(tmp_path):
    run = tmp_path / "run"
    proc = run_main(
        "fit", "--config", "configs/smoke.yaml", "--model.optimizer.lr", "3.5e-4", "--model.optimizer.warmup_steps", "0",
        "--trainer.max_steps", "2", f"--trainer.default_root_dir={run}", "--trainer.logger=false",
        "--trainer.callbacks=lightning.pytorch.callbacks.ModelCheckpoint", f"--trainer.callbacks.dirpath={run}/ckpt",
        "--trainer.callbacks.every_n_train_steps=2",  # the demo holds out a validation set, run only every 5 epochs
        f"--data.root={tmp_path}/data", "--data.synthetic_samples=16", "--data.synthetic_resolution=32", "--data.batch_size=4",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(next((run / "ckpt").glob("*.ckpt")), map_location="cpu", weights_only=False)
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(3.5e-4)
    assert ckpt["hyper_parameters"]["optimizer"]["lr"] == pytest.approx(3.5e-4)


# Bad single options (unknown preset, resolution, missing data root, LR, replicas) are rows of
# docs/bad-command-lines.md, run in-process by tests/test_bad_command_lines.py.


def test_missing_prompt_file_fails_even_with_synthetic_prompts():
    """PromptDataModule serves the file's prompts *and* the synthetic ones: a given file must exist."""
    proc = run_main("fit", "--config", "configs/grpo.yaml", "--data.prompt_file=/nonexistent/prompts.jsonl", timeout=120)
    assert proc.returncode == 2
    lines = error_lines(proc.stderr)
    assert lines == ["error: --data.prompt_file: '/nonexistent/prompts.jsonl' does not exist; fix the path"], proc.stderr[-2000:]


def _cfg(devices=1, nodes=1, data=None, model=None, strategy=None):
    trainer = {"devices": devices, "num_nodes": nodes}
    if strategy is not None:
        trainer["strategy"] = {"class_path": "lit_ovis.parallel.strategy.AtomicModelParallelStrategy", "init_args": strategy}
    return {"trainer": trainer, "model": {"init_args": model or {}}, "data": {"init_args": data or {}}}


@pytest.mark.parametrize(
    "cfg,message",
    [
        (_cfg(data={"prompt_file": "/nonexistent/p.jsonl", "synthetic_prompts": 256}), "--data.prompt_file: '/nonexistent/p.jsonl' does not exist"),
        (_cfg(data={"root": "data/x", "synthetic_samples": 16, "val_root": "/nonexistent/val"}), "--data.val_root: '/nonexistent/val' does not exist"),
        (_cfg(8, 1, model={"parallel": {"data_parallel_replicate": 3}}), "data_parallel_replicate=3 does not divide world size 8"),
        (_cfg(8, 2, model={"parallel": {"data_parallel_replicate": 5}}), "data_parallel_replicate=5 does not divide world size 16 (trainer.num_nodes=2 x trainer.devices=8); set it to the number of nodes (2)"),
        (_cfg(8, 1, model={"parallel": {"data_parallel_replicate": 0}}), "data_parallel_replicate must be >= 1"),
        (_cfg(8, 1, strategy={"tensor_parallel_size": 3, "data_parallel_size": "auto"}), "tensor_parallel_size=3 does not divide world size 8"),
        (_cfg(8, 1, strategy={"tensor_parallel_size": 1, "data_parallel_size": 4}), "data_parallel_size=4 x tensor_parallel_size=1 != world size 8"),
        (_cfg(8, 1, data={"synthetic_prompts": 4, "batch_size": 1}), "--data.synthetic_prompts=4 is fewer than --data.batch_size=1 x 8 ranks"),
        (_cfg("0,1,2,3", 1, data={"root": "d", "synthetic_samples": 12, "batch_size": 4}), "--data.synthetic_samples=12 is fewer than --data.batch_size=4 x 4 ranks"),
        (_cfg(model={"grpo": {"update": {"batch_size": 0}}}), "--model.grpo.update.batch_size must be >= 1"),
        (_cfg(model={"grpo": {"rollout": {"batch_size": 0}}}), "--model.grpo.rollout.batch_size must be >= 1"),
        (_cfg(model={"grpo": {"rollout": {"sampler": "cps", "steps": 1}}}), "--model.grpo.rollout.steps must be >= 2"),
        (_cfg(model={"grpo": {"rollout": {"height": 500, "width": 512}}}), "--model.grpo.rollout.height/width: 500x512 is not a multiple of 16"),
        (_cfg(data={"batch_size": 0}), "--data.batch_size must be >= 1"),
    ],
)
def test_preflight_rejects_configs_that_cannot_work(cfg, message):
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "cfg",
    [
        _cfg(8, 1, model={"parallel": {"hsdp": True, "data_parallel_replicate": 1}}),  # 1 node: plain FSDP in a 1x8 mesh
        _cfg(8, 4, model={"parallel": {"hsdp": True, "data_parallel_replicate": 4}}),  # 4 nodes x 8 GPUs: 4x8 HSDP
        _cfg(8, 1, strategy={"tensor_parallel_size": 2, "data_parallel_size": 4}),
        _cfg("auto", 1, model={"parallel": {"data_parallel_replicate": 3}}),  # world size unknown until launch
        _cfg(8, 1, data={"synthetic_prompts": 4, "batch_size": 1, "prompt_file": __file__}),  # the file adds prompts
        _cfg(model={"grpo": {"rollout": {"sampler": "sde", "steps": 1, "group_size": 4}, "update": {"batch_size": 3}}}),
    ],
)
def test_preflight_accepts_configs_that_work(cfg):
    check_config(cfg)


def test_ckpt_path_null_is_kept_for_a_fresh_start(capsys):
    with pytest.raises(SystemExit) as exit_:
        run(["fit", "--config", "configs/smoke.yaml", "--ckpt_path", "null", "--print_config"])
    assert exit_.value.code == 0 and "\nckpt_path: null\n" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["missing", "garbage", "truncated"])
def test_missing_or_corrupt_ckpt_path_is_one_line(tmp_path, capsys, kind):
    ckpt = tmp_path / "model.ckpt"
    if kind == "garbage":
        ckpt.write_bytes(b"\x80\x02 not a checkpoint at all" * 100)
    elif kind == "truncated":
        torch.save({"state_dict": {"w": torch.zeros(10_000)}}, ckpt)
        ckpt.write_bytes(ckpt.read_bytes()[:20_000])  # a copy cut short
    with pytest.raises(SystemExit) as exit_:
        run(["fit", "--config", "configs/smoke.yaml", "--ckpt_path", str(ckpt), "--trainer.logger=false",
             f"--trainer.default_root_dir={tmp_path}", f"--data.root={tmp_path}/data"])
    assert exit_.value.code == 2
    lines = error_lines(capsys.readouterr().err)
    expected = "does not exist" if kind == "missing" else "is not a complete checkpoint (truncated or corrupt)"
    assert len(lines) == 1 and f"--ckpt_path: '{ckpt}'" in lines[0] and expected in lines[0], lines
    assert "`null` to start fresh" in lines[0]
    assert not (tmp_path / "data").exists()  # failed right after parsing: no data or model work


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from data_modules.streaming import ensure_synthetic_dataset

    root = tmp_path_factory.mktemp("cli_data") / "data"
    ensure_synthetic_dataset(str(root), 16, 32)
    return root


def tiny_run(tmp_path, data, *callbacks: str, steps: int = 6) -> subprocess.CompletedProcess:
    return run_main(
        "fit", "--config", "configs/smoke.yaml", "--trainer.max_steps", str(steps), f"--trainer.default_root_dir={tmp_path}/run",
        "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.callbacks=callbacks.nan_guard.NanGuard",
        "--trainer.callbacks.max_consecutive=2", *callbacks, f"--data.root={data}", "--data.synthetic_samples=16",
        "--data.synthetic_resolution=32", "--data.batch_size=4", "--data.num_workers=0",
    )


def test_diverged_run_stops_with_one_line(tmp_path, tiny_data):
    proc = tiny_run(tmp_path, tiny_data, "--trainer.callbacks+=callbacks.fault_injection.FaultInjector",
                    "--trainer.callbacks.kill_at_step=2", "--trainer.callbacks.phase=nan_grad")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "stopping: 2 consecutive steps with NaN/Inf loss or gradients (last at step 3)" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_full_disk_during_training_keeps_last_checkpoint_and_says_so(tmp_path, tiny_data):
    from helpers import mounted_tmpfs

    with mounted_tmpfs(tmp_path / "ckpt", "48m") as mnt:
        # a demo checkpoint is ~35 MB: the first fits in 48 MB, the second cannot sit beside it while written
        proc = tiny_run(tmp_path, tiny_data, "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                        f"--trainer.callbacks.dirpath={mnt}", "--trainer.callbacks.every_n_train_steps=1",
                        "--trainer.callbacks.save_top_k=0", "--trainer.callbacks.save_last=true", steps=3)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = error_lines(proc.stderr)
        assert len(lines) == 1 and "(No space left on device); the previous checkpoint last.ckpt is intact; free disk space" in lines[0], proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        assert sorted(p.name for p in mnt.iterdir()) == ["last.ckpt"]  # no temp file left
        assert torch.load(mnt / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 1


def test_preflight_lets_hub_ids_through_and_leaves_the_hardware_check_to_where_the_job_runs():
    check_config(_cfg(model={"backbone": {"preset": "ovis-image-7b", "pretrained": "AIDC-AI/Ovis-Image-7B"}}))
    with pytest.raises(ConfigError, match="--model.backbone.pretrained: 'AIDC-AI/Ovis-Image-7B.safetensors' does not exist"):
        check_config(_cfg(model={"backbone": {"pretrained": "AIDC-AI/Ovis-Image-7B.safetensors"}}))
    gpu_job = {**_cfg(8), "trainer": {"devices": 8, "num_nodes": 1, "accelerator": "gpu"}}
    check_config(gpu_job, this_machine=False)  # `lit-ovis submit` on a login node
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--trainer.accelerator=gpu but no GPU is visible"):
            check_config(gpu_job)


def test_last_checkpoint_holds_the_final_step_when_max_steps_is_not_a_multiple_of_the_interval(tmp_path, tiny_data):
    # Lightning alone left `last` at step 4: its train-end save only runs when the run saved nothing before.
    proc = tiny_run(tmp_path, tiny_data, "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                    "--trainer.callbacks.every_n_train_steps=4", "--trainer.callbacks.save_top_k=-1",
                    "--trainer.callbacks.save_last=true", steps=6)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=1-step=4.ckpt", "last.ckpt"]
    assert torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 6
