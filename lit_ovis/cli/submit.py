"""`lit-ovis submit`: render an sbatch script from the same LightningCLI config and submit it.

One task per GPU (`srun` starts them; Lightning's SLURMEnvironment reads ranks from SLURM). With HSDP in
the config, the mesh is matched to the allocation: `model.parallel.data_parallel_replicate` = nodes
(replicate across nodes, shard within a node; 1 node = plain FSDP over its GPUs) unless the overrides set
it. `--signal=SIGUSR1@<signal-seconds>` lets `callbacks.preemption.RequeueOnSignal` save a checkpoint and
requeue the job before the time limit, `--requeue` covers preemption; a requeued job reruns the same
command, which resumes from the newest complete checkpoint. The config is parsed and preflight-checked
before sbatch is called, so a config that cannot work fails in seconds instead of after queueing.

    lit-ovis submit --config configs/sft.yaml --nodes 4 --gpus-per-node 8 --time 2-00:00:00 \\
        --partition gpu --account myproj -- --model.optimizer.lr 1e-5

`--prepare` submits `lit-ovis prepare` instead, with the prepare options after `--`: one srun task per GPU in one
gloo group (the ranks encode their slices, then deduplicate and write together), or with `--array K` a SLURM array
of K independent shards (one GPU each, scheduled as GPUs free up) followed by a merge job that starts when every
shard has succeeded (`--dependency=afterok`). A requeued or rerun job reuses every finished shard.

    lit-ovis submit --prepare --nodes 4 --gpus-per-node 8 --time 1-00:00:00 -- \\
        --tar 's3://bucket/laion/{00000..09999}.tar' --output-dir /shared/laion-1024 --resolution 1024 --vae flux
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from lit_ovis.errors import OneLineArgumentParser

TEMPLATE = """#!/bin/bash
#SBATCH --job-name={job_name}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node={tasks_per_node}
{gpu_line}#SBATCH --cpus-per-task={cpus_per_task}
#SBATCH --time={time}
#SBATCH --output={log_dir}/%x-%j.out
#SBATCH --error={log_dir}/%x-%j.err
#SBATCH --signal=SIGUSR1@{signal_seconds}
#SBATCH --requeue
#SBATCH --open-mode=append
{extra_lines}
# Rendered by `lit-ovis submit`. Lightning reads ranks from SLURM (SLURMEnvironment); on SIGUSR1
# ({signal_seconds} s before the limit) RequeueOnSignal saves a checkpoint within {check_every} steps and requeues;
# the rerun resumes from the newest checkpoint.
set -euo pipefail
cd {workdir}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{env_lines}
echo "job $SLURM_JOB_ID restart count ${{SLURM_RESTART_COUNT:-0}} on $(hostname)"
srun --kill-on-bad-exit=1 {python} main.py fit {args}
"""

PREPARE_HEADER = """#!/bin/bash
#SBATCH --job-name={job_name}
{shape_lines}#SBATCH --cpus-per-task={cpus_per_task}
#SBATCH --time={time}
#SBATCH --output={log_dir}/%x-%A_%a.out
#SBATCH --error={log_dir}/%x-%A_%a.err
#SBATCH --requeue
#SBATCH --open-mode=append
{extra_lines}
# Rendered by `lit-ovis submit --prepare`. Finished shards are cached under the output dir: a requeued or rerun
# job redoes at most one shard per rank.
set -euo pipefail
cd {workdir}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{env_lines}
"""

REPLICATE = "--model.parallel.data_parallel_replicate"


def job_args(config: list[str], nodes: int, tasks_per_node: int, cpu: bool = False, check_every_n_steps: int = 10,
             replicate: int | None = None, overrides: list[str] | None = None) -> list[str]:
    """The `main.py fit` arguments of the job; user overrides come last, so they win."""
    args = [a for c in config for a in ("--config", c)]
    args += ["--trainer.num_nodes", str(nodes), "--trainer.devices", str(tasks_per_node)]
    # Checkpoint + requeue at batch boundaries (safe with many ranks) instead of inside the signal handler.
    args += ["--trainer.plugins+=lightning.pytorch.plugins.environments.SLURMEnvironment", "--trainer.plugins.auto_requeue=false",
             "--trainer.callbacks+=callbacks.preemption.RequeueOnSignal", f"--trainer.callbacks.check_every_n_steps={check_every_n_steps}"]
    if cpu:
        args += ["--trainer.accelerator", "cpu"]
    if replicate is not None:
        args += [REPLICATE, str(replicate)]
    return args + list(overrides or [])


def uses_hsdp(cfg) -> bool:
    from lit_ovis.preflight import _get

    parallel = _get(cfg, "model.init_args.parallel") or {}
    return bool(_get(parallel, "hsdp", False)) or int(_get(parallel, "data_parallel_replicate", 1) or 1) > 1


def render(args: list[str], nodes: int, gpus_per_node: int, time: str, job_name: str, log_dir: str, partition: str | None = None,
           account: str | None = None, cpus_per_task: int = 8, signal_seconds: int = 90, check_every_n_steps: int = 10,
           python: str | None = None, workdir: str | None = None, cpu: bool = False, env: list[str] | None = None) -> str:
    extra = []
    if partition:
        extra.append(f"#SBATCH --partition={partition}")
    if account:
        extra.append(f"#SBATCH --account={account}")
    return TEMPLATE.format(
        job_name=job_name, nodes=nodes, tasks_per_node=gpus_per_node, gpu_line="" if cpu else f"#SBATCH --gpus-per-node={gpus_per_node}\n",
        cpus_per_task=cpus_per_task, time=time, log_dir=log_dir, signal_seconds=signal_seconds, check_every=check_every_n_steps,
        extra_lines="\n".join(extra), workdir=shlex.quote(workdir or str(Path.cwd())),
        env_lines="\n".join(f"export {e}" for e in (env or [])), python=shlex.quote(python or sys.executable), args=shlex.join(args),
    )


def prepare_args(config: list[str], nodes: int, tasks_per_node: int, cpu: bool, check_every_n_steps: int, overrides: list[str]) -> list[str]:
    """Parse the job's config exactly as the job will, match the HSDP mesh to the allocation, and run the
    preflight checks on the result (raises ConfigError)."""
    from lit_ovis.cli.lightning_cli import parse_config
    from lit_ovis.preflight import check_config

    args = job_args(config, nodes, tasks_per_node, cpu, check_every_n_steps, overrides=overrides)
    cfg = parse_config(["fit", *args])
    if uses_hsdp(cfg) and not any("data_parallel_replicate" in o for o in overrides):
        args = job_args(config, nodes, tasks_per_node, cpu, check_every_n_steps, replicate=nodes, overrides=overrides)
        cfg["model.init_args.parallel.data_parallel_replicate"] = nodes
    check_config(cfg, this_machine=False)  # the job's GPUs are on the compute nodes, not here
    return args


def render_prepare(prepare_args: list[str], nodes: int, gpus_per_node: int, time: str, job_name: str, log_dir: str,
                   partition: str | None = None, account: str | None = None, cpus_per_task: int = 8, python: str | None = None,
                   workdir: str | None = None, cpu: bool = False, env: list[str] | None = None, array: int | None = None) -> list[str]:
    """The sbatch script(s) of a prepare job: one group job, or (`array`) the array of shards and then the merge."""
    extra = [f"#SBATCH --partition={partition}"] * bool(partition) + [f"#SBATCH --account={account}"] * bool(account)
    py = shlex.quote(python or sys.executable)
    common = dict(job_name=job_name, cpus_per_task=cpus_per_task, time=time, log_dir=log_dir, extra_lines="\n".join(extra),
                  workdir=shlex.quote(workdir or str(Path.cwd())), env_lines="\n".join(f"export {e}" for e in (env or [])))
    gpu = "" if cpu else "#SBATCH --gpus-per-node={n}\n"
    command = f"{py} -m data_modules.prepare {shlex.join(prepare_args)}"
    if array is None:
        shape = f"#SBATCH --nodes={nodes}\n#SBATCH --ntasks-per-node={gpus_per_node}\n" + gpu.format(n=gpus_per_node)
        return [PREPARE_HEADER.format(shape_lines=shape, **common) + (
            "# One task per GPU; the tasks form one gloo group (ranks from SLURM_PROCID / SLURM_STEP_NUM_TASKS).\n"
            'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)\n'
            "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))\n"
            f"srun --kill-on-bad-exit=1 {command}\n")]
    shard = f"#SBATCH --array=0-{array - 1}\n#SBATCH --nodes=1\n#SBATCH --ntasks=1\n" + gpu.format(n=1)
    merge = "#SBATCH --nodes=1\n#SBATCH --ntasks=1\n"
    return [PREPARE_HEADER.format(shape_lines=shard, **common) +
            "# Task K of the array prepares shard K (SLURM_ARRAY_TASK_ID of SLURM_ARRAY_TASK_COUNT) and stops.\n" + command + "\n",
            PREPARE_HEADER.format(shape_lines=merge, **{**common, "job_name": f"{job_name}-merge"}) +
            "# Starts once every shard succeeded: global dedup and the write of every bucket's dataset.\n" + command + " --merge true\n"]


def submit_prepare(a, prepare_args: list[str]) -> int:
    """`lit-ovis submit --prepare`: check the prepare options here, then render and submit its job(s)."""
    from data_modules.prepare import parse_config
    from lit_ovis.errors import ConfigError

    if any(o in prepare_args for o in ("--num-shards", "--shard-index", "--merge")):
        print("error: --num-shards / --shard-index / --merge are set by the job itself; leave them out of the prepare options", file=sys.stderr)
        return 2
    try:
        parse_config(prepare_args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if a.array is not None and a.array < 1:
        print(f"error: --array must be >= 1 shards (got {a.array})", file=sys.stderr)
        return 2
    scripts = render_prepare(prepare_args, a.nodes, a.gpus_per_node, a.time, a.job_name, a.log_dir, a.partition, a.account,
                             a.cpus_per_task, cpu=a.cpu, env=a.env, array=a.array)
    if a.dry_run:
        print("\n".join(scripts))
        return 0
    Path(a.log_dir).mkdir(parents=True, exist_ok=True)
    base = Path(a.output or Path(a.log_dir) / f"{a.job_name}.sbatch")
    paths = [base] if len(scripts) == 1 else [base.with_name(f"{base.stem}-shards.sbatch"), base.with_name(f"{base.stem}-merge.sbatch")]
    for path, script in zip(paths, scripts):
        path.write_text(script)
    if not shutil.which("sbatch"):
        print(f"error: sbatch not found; the script(s) are at {', '.join(map(str, paths))} (submit on a SLURM login node"
              f"{'; the merge with --dependency=afterok:<shards job id>' if len(paths) > 1 else ''})", file=sys.stderr)
        return 2
    ids: list[str] = []
    for path in paths:
        cmd = ["sbatch", "--parsable", *([f"--dependency=afterok:{ids[-1]}"] if ids else []), str(path)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"error: sbatch failed for {path}: {out.stderr.strip()}", file=sys.stderr)
            return 2
        ids.append(out.stdout.strip().split(";")[0])
    print(" ".join(ids))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = OneLineArgumentParser(prog="lit-ovis submit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", help="training config(s) of the job (required unless --prepare)")
    p.add_argument("--prepare", action="store_true", help="submit `lit-ovis prepare` with the options after `--` instead of training")
    p.add_argument("--array", type=int, default=None, metavar="K",
                   help="with --prepare: K independent shards as a SLURM array (one GPU each), then a merge job after them")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="tasks per node (one process per GPU, or per CPU task with --cpu)")
    p.add_argument("--time", default="1-00:00:00")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--cpus-per-task", type=int, default=8)
    p.add_argument("--job-name", default="lit-ovis")
    p.add_argument("--log-dir", default="logs/slurm")
    p.add_argument("--signal-seconds", type=int, default=90,
                   help="SIGUSR1 this long before the time limit; must exceed --check-every-n-steps steps plus one checkpoint save")
    p.add_argument("--check-every-n-steps", type=int, default=10, help="how often the ranks check for the signal (one tiny all-reduce)")
    p.add_argument("--cpu", action="store_true", help="CPU-only job (tests, demos)")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE exported in the job")
    p.add_argument("--output", default=None, help="write the script here (default: <log-dir>/<job-name>.sbatch)")
    p.add_argument("--dry-run", action="store_true", help="check the config and print the script, do not submit")
    a = p.parse_args(argv)
    if a.prepare:
        return submit_prepare(a, overrides)
    if not a.config:
        p.error("--config is required (the training config of the job), or pass --prepare to submit a prepare job")
    from lit_ovis.cli.lightning_cli import USER_ERRORS

    try:
        args = prepare_args(a.config, a.nodes, a.gpus_per_node, a.cpu, a.check_every_n_steps, overrides)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    script = render(args, a.nodes, a.gpus_per_node, a.time, a.job_name, a.log_dir, a.partition, a.account, a.cpus_per_task,
                    a.signal_seconds, a.check_every_n_steps, cpu=a.cpu, env=a.env)
    if a.dry_run:
        print(script)
        return 0
    Path(a.log_dir).mkdir(parents=True, exist_ok=True)
    path = Path(a.output or Path(a.log_dir) / f"{a.job_name}.sbatch")
    path.write_text(script)
    if not shutil.which("sbatch"):
        print(f"error: sbatch not found; the script is at {path} (submit it on a SLURM login node)", file=sys.stderr)
        return 2
    out = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        print(f"error: sbatch failed: {out.stderr.strip()}", file=sys.stderr)
        return 2
    print(out.stdout.strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
