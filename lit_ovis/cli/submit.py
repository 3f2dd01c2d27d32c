"""`lit-ovis submit`: render an sbatch script from the same LightningCLI config and submit it.

One task per GPU (`srun` starts them; Lightning's SLURMEnvironment reads ranks from SLURM), the HSDP
mesh matched to nodes x GPUs (replicate across nodes), `--signal=SIGUSR1@90` so Lightning saves a
checkpoint and requeues itself before the time limit, `--requeue` for preemption. A requeued job reruns
the same command, which resumes from the newest complete checkpoint.

    lit-ovis submit --config configs/sft.yaml --nodes 4 --gpus-per-node 8 --time 2-00:00:00 \\
        --partition gpu --account myproj -- --model.optimizer.lr 1e-5
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

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
# Rendered by `lit-ovis submit`. Lightning reads ranks from SLURM (SLURMEnvironment), saves a checkpoint on
# SIGUSR1 ({signal_seconds} s before the limit) and requeues; the rerun resumes from the newest checkpoint.
set -euo pipefail
cd {workdir}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{env_lines}
echo "job $SLURM_JOB_ID restart count ${{SLURM_RESTART_COUNT:-0}} on $(hostname)"
srun --kill-on-bad-exit=1 {python} main.py fit {args}
"""


def render(config: list[str], nodes: int, gpus_per_node: int, time: str, job_name: str, log_dir: str, partition: str | None = None,
           account: str | None = None, cpus_per_task: int = 8, signal_seconds: int = 90, python: str | None = None,
           workdir: str | None = None, cpu: bool = False, overrides: list[str] | None = None, env: list[str] | None = None) -> str:
    tasks = gpus_per_node
    args = [f"--config {shlex.quote(c)}" for c in config]
    args += [f"--trainer.num_nodes {nodes}", f"--trainer.devices {tasks}"]
    # Checkpoint + requeue at batch boundaries (safe with many ranks) instead of inside the signal handler.
    args += ["--trainer.plugins+=lightning.pytorch.plugins.environments.SLURMEnvironment", "--trainer.plugins.auto_requeue=false",
             "--trainer.callbacks+=callbacks.preemption.RequeueOnSignal"]
    if cpu:
        args += ["--trainer.accelerator cpu"]
    elif nodes > 1:
        args += [f"--model.parallel.data_parallel_replicate {nodes}"]
    args += [shlex.quote(o) for o in (overrides or [])]
    extra = []
    if partition:
        extra.append(f"#SBATCH --partition={partition}")
    if account:
        extra.append(f"#SBATCH --account={account}")
    return TEMPLATE.format(
        job_name=job_name, nodes=nodes, tasks_per_node=tasks, gpu_line="" if cpu else f"#SBATCH --gpus-per-node={gpus_per_node}\n",
        cpus_per_task=cpus_per_task, time=time, log_dir=log_dir, signal_seconds=signal_seconds, extra_lines="\n".join(extra),
        workdir=shlex.quote(workdir or str(Path.cwd())), env_lines="\n".join(f"export {e}" for e in (env or [])),
        python=shlex.quote(python or sys.executable), args=" ".join(args),
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="lit-ovis submit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", required=True)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="tasks per node (one process per GPU, or per CPU task with --cpu)")
    p.add_argument("--time", default="1-00:00:00")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--cpus-per-task", type=int, default=8)
    p.add_argument("--job-name", default="lit-ovis")
    p.add_argument("--log-dir", default="logs/slurm")
    p.add_argument("--signal-seconds", type=int, default=90)
    p.add_argument("--cpu", action="store_true", help="CPU-only job (tests, demos)")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE exported in the job")
    p.add_argument("--output", default=None, help="write the script here (default: <log-dir>/<job-name>.sbatch)")
    p.add_argument("--dry-run", action="store_true", help="print the script, do not submit")
    args = p.parse_args(argv)
    script = render(args.config, args.nodes, args.gpus_per_node, args.time, args.job_name, args.log_dir, args.partition, args.account,
                    args.cpus_per_task, args.signal_seconds, cpu=args.cpu, overrides=overrides, env=args.env)
    if args.dry_run:
        print(script)
        return 0
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    path = Path(args.output or Path(args.log_dir) / f"{args.job_name}.sbatch")
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
