#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a virtualenv in .venv with the pinned torch, the project and its
# test extra, plus the Debian fonts the text-rendering engine uses (Latin + CJK) when apt is available.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
  if ! fc-list 2>/dev/null | grep -qi "wqy"; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-wqy-microhei fonts-dejavu-core >/dev/null) \
      || echo "warning: could not install fonts-wqy-microhei/fonts-dejavu-core; Chinese text rendering will be skipped"
  fi
fi

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
STAMP=.venv/.lit-ovis-installed
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
  # torch and torchvision first, pinned together (litdata needs torchvision; the pair must match).
  .venv/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "is ignored" || true
  .venv/bin/pip install -q -e ".[test]" 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -c "import lit_ovis, torch, torchvision, lightning, diffusers, litdata; from diffusers import OvisImagePipeline"  # lit_ovis first: it quiets torchao's import notices
  touch "$STAMP"
fi
echo "environment ready: $(.venv/bin/python -c 'import torch, lightning, diffusers; print(f"torch {torch.__version__}, lightning {lightning.__version__}, diffusers {diffusers.__version__}")')"
