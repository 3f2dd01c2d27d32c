#!/usr/bin/env bash
# The test command: set up (idempotent), then run the whole suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# One pytest worker per core (at most 4): tiny-model tests are bound by Python overhead, so one process per
# core with one thread each beats one process with several threads. LIT_OVIS_TEST_WORKERS=0 runs serially.
WORKERS=${LIT_OVIS_TEST_WORKERS:-$(.venv/bin/python -c 'import os; print(min(4, len(os.sched_getaffinity(0))))')}
if [ "$WORKERS" -gt 1 ]; then
  export OMP_NUM_THREADS=1  # subprocesses started by tests, too
  exec .venv/bin/python -m pytest -q -n "$WORKERS" --dist worksteal "$@"
fi
exec .venv/bin/python -m pytest -q "$@"
