#!/usr/bin/env bash
# The README's test command: set up (idempotent), then the whole suite, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
export HF_HOME="$(mktemp -d)"
.venv/bin/ruff check dvpo_lightning tests benchmarks
.venv/bin/python -m pytest -q --durations=25 "$@"
