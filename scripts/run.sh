#!/usr/bin/env bash
# The README's main job: set up (idempotent, the locked environment), then the pipeline on the
# embedded sorting task. A pipeline file as the first argument runs that study instead
# (bash scripts/run.sh configs/pipeline_gvm_quality.yaml); other arguments go to the pipeline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
# The same float kernels on every AVX2 machine, and the thread count the study was made with:
# one per run, two runs at once (configs/pipeline.yaml's workers; a reduction split over other
# thread counts may add in another order). docs/reproducibility.md has the measurements. Set
# either variable beforehand to override it.
export ATEN_CPU_CAPABILITY=${ATEN_CPU_CAPABILITY:-avx2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
config=configs/pipeline.yaml
if [[ "${1:-}" == *.yaml ]]; then
    config=$1
    shift
fi
.venv/bin/python -m dvpo_lightning pipeline --config "$config" "$@"
