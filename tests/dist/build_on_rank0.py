"""Run by tests/test_hostile.py: `data_modules.streaming.build_on_rank0` on 2 gloo processes. Three builds:
one that succeeds, one whose error on rank 0 must reach rank 1, one that outlasts the waiting timeout.
Each rank writes what it saw to <out>/rank<r>.json."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def worker(rank: int, out: str) -> None:
    import torch.distributed as dist

    from data_modules.rank0 import build_on_rank0
    from lit_ovis.errors import DataError

    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=2)
    seen: dict[str, object] = {}
    marker = Path(out) / "built"

    def outcome(name, build, timeout_s):
        start = time.monotonic()
        try:
            build_on_rank0(build, "build the set", timeout_s)
            seen[name] = "ok"
        except DataError as err:
            seen[name] = f"DataError: {err}"
        seen[name + "_seconds"] = round(time.monotonic() - start, 2)

    outcome("success", lambda: marker.write_text("x"), 60)
    seen["marker_seen_after_success"] = marker.exists()
    outcome("failure", lambda: (_ for _ in ()).throw(DataError("data/x: no space left on device")), 60)
    if rank == 1:  # rank 0's build below sleeps past rank 1's timeout; rank 0 then learns rank 1 is gone
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(seen))
    outcome("timeout", lambda: time.sleep(8), 2)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(seen))


def main() -> None:
    import torch.multiprocessing as mp

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    mp.spawn(worker, args=(args.out,), nprocs=2, join=True)


if __name__ == "__main__":
    main()
