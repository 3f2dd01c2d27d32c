#!/usr/bin/env bash
# The demo: set up (idempotent), then train the tiny model on a synthetic text-rendering dataset on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python main.py fit --config configs/demo.yaml "$@"
