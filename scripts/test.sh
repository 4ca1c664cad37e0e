#!/usr/bin/env bash
# The README's test command: set up (idempotent), then the whole suite, offline.
#   bash scripts/test.sh            every test (what CI runs)
#   bash scripts/test.sh --fast     the fast tier alone: unit tests of the pure parts (no model
#                                   trained or served, no process started; tests/conftest.py)
# Other arguments go to pytest (a file, -k EXPR, -x, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
tier=()
args=()
for a in "$@"; do
  if [[ "$a" == "--fast" ]]; then tier=(-m "not integration"); else args+=("$a"); fi
done
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
export HF_HOME="$(mktemp -d)"
.venv/bin/ruff check dvpo_lightning tests benchmarks
.venv/bin/python -m pytest -q --durations=25 ${tier[@]+"${tier[@]}"} ${args[@]+"${args[@]}"}
