"""`lit-ovis submit`: the rendered sbatch script (dry run) launches one task per GPU under Lightning's SLURM
environment with the warning signal and requeue, matches the HSDP mesh to the allocation, passes the
same configs and overrides through, and a config that cannot work fails before sbatch is called."""

from __future__ import annotations

import re
import shlex

import pytest

from lit_ovis.cli import submit

HSDP = ["--config", "configs/smoke.yaml", "--config", "configs/strategy/hsdp.yaml"]


def dry_run(capsys, *argv: str) -> str:
    argv = list(argv)
    argv.insert(argv.index("--") if "--" in argv else len(argv), "--dry-run")  # submit's own options come before `--`
    assert submit.main(argv) == 0
    return capsys.readouterr().out


def srun_args(script: str) -> list[str]:
    line = next(l for l in script.splitlines() if l.startswith("srun "))
    tokens = shlex.split(line)
    return tokens[tokens.index("main.py") + 2:]  # after `main.py fit`


def option(args: list[str], key: str) -> list[str]:
    """Every value given to `key` (last one wins in LightningCLI)."""
    return [args[i + 1] for i, a in enumerate(args) if a == key]


@pytest.mark.parametrize("nodes", [1, 4])
def test_dry_run_renders_the_job(capsys, nodes):
    script = dry_run(capsys, *HSDP, "--nodes", str(nodes), "--gpus-per-node", "8", "--time", "2-00:00:00", "--partition", "gpu",
                     "--account", "proj", "--log-dir", "logs/run1", "--signal-seconds", "300", "--check-every-n-steps", "5",
                     "--job-name", "pretrain", "--", "--model.optimizer.lr", "1e-5", "--trainer.max_steps=100")
    header = [l for l in script.splitlines() if l.startswith("#SBATCH")]
    for expected in [f"--nodes={nodes}", "--ntasks-per-node=8", "--gpus-per-node=8", "--time=2-00:00:00", "--partition=gpu",
                     "--account=proj", "--signal=SIGUSR1@300", "--requeue", "--output=logs/run1/%x-%j.out",
                     "--error=logs/run1/%x-%j.err", "--job-name=pretrain"]:
        assert f"#SBATCH {expected}" in header, (expected, header)
    assert "srun --kill-on-bad-exit=1 " in script  # srun starts ntasks-per-node processes: one per GPU
    args = srun_args(script)
    assert option(args, "--config") == ["configs/smoke.yaml", "configs/strategy/hsdp.yaml"]
    assert option(args, "--trainer.num_nodes") == [str(nodes)] and option(args, "--trainer.devices") == ["8"]
    assert "--trainer.plugins+=lightning.pytorch.plugins.environments.SLURMEnvironment" in args
    assert "--trainer.plugins.auto_requeue=false" in args
    i = args.index("--trainer.callbacks+=callbacks.preemption.RequeueOnSignal")
    assert args[i + 1] == "--trainer.callbacks.check_every_n_steps=5"
    # hsdp.yaml says replicate 4; the job's mesh is nodes x 8: replicate = nodes (1 node: plain FSDP, 1x8)
    assert option(args, "--model.parallel.data_parallel_replicate") == [str(nodes)]
    assert args[-3:] == ["--model.optimizer.lr", "1e-5", "--trainer.max_steps=100"]  # user overrides last, unchanged


def test_user_replicate_override_wins(capsys):
    args = srun_args(dry_run(capsys, *HSDP, "--nodes", "4", "--gpus-per-node", "8", "--", "--model.parallel.data_parallel_replicate", "8"))
    assert option(args, "--model.parallel.data_parallel_replicate") == ["8"]


def test_no_replicate_override_without_hsdp(capsys):
    script = dry_run(capsys, "--config", "configs/smoke.yaml", "--nodes", "2", "--gpus-per-node", "2", "--cpu")
    args = srun_args(script)
    assert "--model.parallel.data_parallel_replicate" not in args and option(args, "--trainer.accelerator") == ["cpu"]
    assert "--gpus-per-node" not in script


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--nodes", "4", "--gpus-per-node", "8", "--", "--model.parallel.data_parallel_replicate", "3"],
         "data_parallel_replicate=3 does not divide world size 32"),
        (["--nodes", "1", "--gpus-per-node", "8", "--", "--model.optimizer.lr=-1"], "--model.optimizer.lr must be > 0"),
    ],
)
def test_bad_config_fails_before_sbatch(capsys, monkeypatch, tmp_path, argv, message):
    calls = []
    monkeypatch.setattr(submit.subprocess, "run", lambda *a, **k: calls.append(a))
    code = submit.main([*HSDP, "--log-dir", str(tmp_path / "logs"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and not calls  # sbatch never ran
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "logs").exists()


def test_submit_writes_the_script_and_calls_sbatch(capsys, monkeypatch, tmp_path):
    class Done:
        returncode, stdout, stderr = 0, "4242\n", ""

    calls = []
    monkeypatch.setattr(submit.shutil, "which", lambda name: "/usr/bin/sbatch")
    monkeypatch.setattr(submit.subprocess, "run", lambda cmd, **k: calls.append(cmd) or Done())
    assert submit.main([*HSDP, "--nodes", "2", "--gpus-per-node", "4", "--log-dir", str(tmp_path)]) == 0
    path = tmp_path / "lit-ovis.sbatch"
    assert calls == [["sbatch", "--parsable", str(path)]]
    assert capsys.readouterr().out.strip().endswith("4242")
    assert re.search(r"--model\.parallel\.data_parallel_replicate 2\b", path.read_text())


def test_prepare_job_is_one_gloo_group_of_srun_tasks(capsys):
    script = dry_run(capsys, "--prepare", "--nodes", "2", "--gpus-per-node", "4", "--", "--tar", "s3://b/{000..009}.tar",
                     "--output-dir", "/shared/out", "--resolution", "512")
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=4" in script and "#SBATCH --gpus-per-node=4" in script
    assert "export MASTER_ADDR=" in script and "export MASTER_PORT=" in script  # ranks.py groups srun tasks with these
    line = next(l for l in script.splitlines() if l.startswith("srun "))
    assert shlex.split(line)[3:] == ["-m", "data_modules.prepare", "--tar", "s3://b/{000..009}.tar", "--output-dir", "/shared/out",
                                     "--resolution", "512"]


def test_prepare_array_then_merge_after_it(capsys, monkeypatch, tmp_path):
    class Done:
        def __init__(self, out):
            self.returncode, self.stdout, self.stderr = 0, out, ""

    calls = []
    monkeypatch.setattr(submit.shutil, "which", lambda name: "/usr/bin/sbatch")
    monkeypatch.setattr(submit.subprocess, "run", lambda cmd, **k: calls.append(cmd) or Done(f"{100 + len(calls)}\n"))
    assert submit.main(["--prepare", "--array", "16", "--log-dir", str(tmp_path), "--", "--synthetic", "64", "--output-dir", "o"]) == 0
    shards, merge = (tmp_path / "lit-ovis-shards.sbatch").read_text(), (tmp_path / "lit-ovis-merge.sbatch").read_text()
    assert "#SBATCH --array=0-15" in shards and "#SBATCH --gpus-per-node=1" in shards and "--merge" not in shards
    assert merge.rstrip().endswith("--output-dir o --merge true") and "--array" not in merge
    assert calls[1][:3] == ["sbatch", "--parsable", "--dependency=afterok:101"] and capsys.readouterr().out.split() == ["101", "102"]
    # Bad prepare options fail here, before anything is queued.
    assert submit.main(["--prepare", "--dry-run", "--", "--synthetic", "4", "--output-dir", "o", "--resolution", "20"]) == 2
    assert "--resolution must be a positive multiple of 16" in capsys.readouterr().err
