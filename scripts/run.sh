#!/usr/bin/env bash
# The README's main job: set up (idempotent), then the pipeline on the embedded sorting task.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
.venv/bin/python -m dvpo_lightning pipeline --config configs/pipeline.yaml "$@"
