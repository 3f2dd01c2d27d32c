"""Work that one rank does for all: rank 0 runs it while the others wait for its outcome, with a timeout.

Lightning's `prepare_data` has the other ranks wait in a barrier without a timeout (and a LitData writer
on rank 0 alone used to wait for index files from ranks that write nothing); here every wait ends, in
one line that names what was waited for and the option that sets the limit.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any, Callable

from lit_ovis.errors import DataError, user_message


def build_on_rank0(build: Callable[[], Any], what: str, timeout_s: float, option: str = "--data.build_timeout_s") -> None:
    """Run `build` on global rank 0 alone while the other ranks wait for its outcome, at most `timeout_s`.

    Without torch.distributed (or with one process) it simply runs `build`. Rank 0 broadcasts success or
    its one-line error over a gloo group whose timeout is `timeout_s`, so a failed build fails every rank
    at once and a build that never ends fails the waiting ranks with one line naming what they waited for."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        build()
        return
    rank = dist.get_rank()
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    outcome: list[str | None] = [None]
    failure: BaseException | None = None
    try:
        if rank == 0:
            try:
                build()
            except Exception as err:  # noqa: BLE001 - every rank must learn of it before rank 0 re-raises
                failure = err
                outcome[0] = user_message(err) or f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        try:
            dist.broadcast_object_list(outcome, src=0, group=group)
        except RuntimeError as err:
            if failure is not None:
                raise failure from None
            detail = re.sub(r"^\[[^\]]*\]\s*", "", (str(err).strip().splitlines() or [type(err).__name__])[0])[:120]  # gloo's source path
            if rank == 0:
                raise DataError(f"rank 0 managed to {what} but the other ranks had stopped waiting ({detail}); "
                                f"build it beforehand or raise {option}") from None
            raise DataError(f"rank {rank} waited up to {timeout_s:g} s for rank 0 to {what} and gave up ({detail}); "
                            f"build it beforehand or raise {option}") from None
    finally:
        dist.destroy_process_group(group)
    if failure is not None:
        raise failure
    if outcome[0] is not None:
        raise DataError(f"rank 0 could not {what}: {outcome[0]}")
