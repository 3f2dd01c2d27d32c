"""Which slice of the inputs this `prepare` process takes, and how its ranks agree.

The shard (index of count) comes from, in order:
1. `--num-shards N --shard-index K` (explicit: no process group; run `--merge` once every shard is done);
2. a SLURM array (`SLURM_ARRAY_TASK_ID` - `SLURM_ARRAY_TASK_MIN` of `SLURM_ARRAY_TASK_COUNT`): no group, `--merge`
   afterwards (e.g. a job with `--dependency=afterok:<array job>`, which `lit-ovis submit --prepare --array` sets up);
3. torchrun (`RANK` / `WORLD_SIZE`): a gloo process group; rank 0 merges when every rank is done;
4. `srun` tasks (`SLURM_PROCID` of `SLURM_STEP_NUM_TASKS`): a gloo group when `MASTER_ADDR` / `MASTER_PORT` are set
   (the sbatch script of `lit-ovis submit --prepare` sets them), else like an array;
5. otherwise one process does everything.

In a group every step that can fail reports to every rank (`everywhere`, `on_rank0`): a rank that fails makes all
of them fail with its one line instead of leaving the others waiting; waits end after `--wait-timeout-s`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Mapping

from lit_ovis.errors import ConfigError, DataError, user_message


@dataclass(frozen=True)
class ShardSpec:
    index: int = 0
    count: int = 1
    launcher: str = "single"  # options | slurm-array | torchrun | srun | single
    grouped: bool = False  # the ranks run together in one process group (merge at the end, by rank 0)

    def describe(self) -> str:
        return f"shard {self.index} of {self.count} ({self.launcher})"


def _int(env: Mapping[str, str], key: str) -> int | None:
    value = env.get(key)
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None


def shard_spec(num_shards: int | None, shard_index: int | None, env: Mapping[str, str] | None = None) -> ShardSpec:
    """This process's slice from the options or the launcher's environment (see the module docstring)."""
    env = os.environ if env is None else env
    if num_shards is not None or shard_index is not None:
        count = 1 if num_shards is None else num_shards
        index = 0 if shard_index is None and count == 1 else shard_index
        if count < 1 or index is None or not 0 <= index < count:
            raise ConfigError(f"--shard-index must be in [0, --num-shards) (got --num-shards {num_shards}, --shard-index {shard_index}); "
                              "pass both, e.g. --num-shards 8 --shard-index 3")
        return ShardSpec(index, count, "options" if count > 1 else "single")
    task, tasks = _int(env, "SLURM_ARRAY_TASK_ID"), _int(env, "SLURM_ARRAY_TASK_COUNT")
    if task is not None and tasks is not None and tasks > 1:
        index = task - (_int(env, "SLURM_ARRAY_TASK_MIN") or 0)
        if not 0 <= index < tasks:
            raise ConfigError(f"SLURM array task {task} is outside 0..{tasks - 1} after SLURM_ARRAY_TASK_MIN; "
                              "use a contiguous --array=0-N range, or pass --num-shards/--shard-index")
        return ShardSpec(index, tasks, "slurm-array")
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    if rank is not None and world is not None and world > 1:
        return ShardSpec(rank, world, "torchrun", grouped=True)
    proc, ntasks = _int(env, "SLURM_PROCID"), _int(env, "SLURM_STEP_NUM_TASKS")
    if proc is not None and ntasks is not None and ntasks > 1:
        return ShardSpec(proc, ntasks, "srun", grouped=bool(env.get("MASTER_ADDR") and env.get("MASTER_PORT")))
    return ShardSpec()


def local_rank(env: Mapping[str, str] | None = None) -> int:
    """This process's GPU on its node (torchrun's LOCAL_RANK, srun's SLURM_LOCALID)."""
    env = os.environ if env is None else env
    return _int(env, "LOCAL_RANK") or _int(env, "SLURM_LOCALID") or 0


# ------------------------------------------------------------------------------------------ collectives
class Collective:
    """What the ranks of one prepare run exchange; a world of one exchanges nothing."""

    rank, world = 0, 1

    def gather(self, obj: Any) -> list[Any]:
        return [obj]

    def broadcast(self, obj: Any) -> Any:
        return obj

    def close(self) -> None:
        pass


class GlooCollective(Collective):
    """The ranks of a torchrun / srun group over gloo (CPU), with a timeout on every exchange."""

    def __init__(self, spec: ShardSpec, timeout_s: float):
        import torch.distributed as dist

        self.rank, self.world = spec.index, spec.count
        self.timeout_s = timeout_s
        self._owns = not dist.is_initialized()
        if self._owns:
            os.environ.setdefault("RANK", str(spec.index))
            os.environ.setdefault("WORLD_SIZE", str(spec.count))
            try:
                dist.init_process_group("gloo", init_method="env://", rank=spec.index, world_size=spec.count,
                                        timeout=timedelta(seconds=timeout_s))
            except (RuntimeError, ValueError) as err:
                raise DataError(f"rank {spec.index} of {spec.count} could not join the other ranks ({_first_line(err)}); "
                                "check MASTER_ADDR / MASTER_PORT, or run the shards separately with --num-shards/--shard-index and --merge") from None
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))

    def _call(self, fn: Callable[[], Any], what: str) -> Any:
        try:
            return fn()
        except RuntimeError as err:  # gloo: a peer died or the timeout passed
            raise DataError(f"rank {self.rank} waited up to {self.timeout_s:g} s for the other ranks to {what} and gave up "
                            f"({_first_line(err)}); rerun the same command (finished shards are kept) or raise --wait-timeout-s") from None

    def gather(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        self._call(lambda: dist.all_gather_object(out, obj, group=self.group), "finish this step")
        return out

    def broadcast(self, obj: Any) -> Any:
        import torch.distributed as dist

        box = [obj]
        self._call(lambda: dist.broadcast_object_list(box, src=0, group=self.group), "hear from rank 0")
        return box[0]

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group(self.group)
            if self._owns:
                dist.destroy_process_group()


def _first_line(err: BaseException) -> str:
    import re

    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return re.sub(r"^\[[^\]]*\]\s*", "", text)[:160]  # gloo prefixes its source path


def _outcome(err: BaseException) -> str:
    return user_message(err) or f"{type(err).__name__}: {_first_line(err)}"


def everywhere(col: Collective, fn: Callable[[], Any], what: str) -> list[Any]:
    """Run `fn` on every rank; every rank gets every rank's result, or every rank raises the first failure's line."""
    failure: BaseException | None = None
    try:
        result, message = fn(), None
    except Exception as err:  # noqa: BLE001 - every rank must hear of it before this one re-raises
        failure, result, message = err, None, _outcome(err)
    outcomes = col.gather((result, message))
    if failure is not None:
        raise failure
    for rank, (_, message) in enumerate(outcomes):
        if message is not None:
            raise DataError(f"rank {rank} could not {what}: {message}")
    return [r for r, _ in outcomes]


def on_rank0(col: Collective, fn: Callable[[], Any], what: str) -> Any:
    """Run `fn` on rank 0 alone; every rank gets its result, or raises its failure's line."""
    failure: BaseException | None = None
    result, message = None, None
    if col.rank == 0:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - the other ranks must hear of it
            failure, message = err, _outcome(err)
    result, message = col.broadcast((result, message))
    if failure is not None:
        raise failure
    if message is not None:
        raise DataError(f"rank 0 could not {what}: {message}")
    return result
