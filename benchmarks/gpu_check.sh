#!/usr/bin/env bash
# One GPU check on a fresh H100/H200, unattended, in under 8 minutes (see benchmarks/gpu_check.py):
#   bash benchmarks/gpu_check.sh [OUT_DIR] [extra gpu_check.py options]
# Writes OUT_DIR/gpu_check.json (after every measurement) and OUT_DIR/gpu_check.md (default runs/gpu_check).
# Uses the virtualenv of scripts/setup.sh (.venv); creates it only when it is missing. The measurements share
# a budget (GPU_CHECK_BUDGET, default 420 s, start-up included); an outer limit (GPU_CHECK_TIMEOUT, default
# 455 s) stops a hung kernel, and the Markdown is then rendered from what was measured.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
shift || true
if [ ! -x .venv/bin/python ]; then
  bash scripts/setup.sh || { echo "gpu_check: scripts/setup.sh failed" >&2; exit 1; }
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
timeout --signal=INT --kill-after=15 "${GPU_CHECK_TIMEOUT:-455}" \
  .venv/bin/python benchmarks/gpu_check.py --out-dir "$OUT" --budget-s "${GPU_CHECK_BUDGET:-420}" "$@" 2>&1 | tee "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
if [ -f "$OUT/gpu_check.json" ]; then
  .venv/bin/python benchmarks/gpu_check.py --render "$OUT/gpu_check.json" && cat "$OUT/gpu_check.md"
fi
exit "$rc"
