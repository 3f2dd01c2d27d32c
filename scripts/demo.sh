#!/usr/bin/env bash
# The demo: set up (idempotent), then configs/demo.yaml: build the six-word task and its autoencoder (first run
# only, cached in data/demo), train the tiny MMDiT on CPU, and print the OCR word accuracy of its samples last.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python main.py fit --config configs/demo.yaml "$@"
