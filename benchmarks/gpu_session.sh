#!/usr/bin/env bash
# The GPU measurements, in parts that each fit one device call (< 10 min), for a session lent a
# GPU machine (see ../shared/gpu/README.md). On this machine first:
#     python3 ../shared/gpu/fetch-wheels.py          # ./.whl (git-ignored)
# and add a vLLM wheel built for the GPU image's torch and CUDA (the image has no vLLM; PyPI's
# vllm 0.32.0 needs torch 2.13, and its wheel is far above the 64 MiB a run may carry: take it
# in parts, see ../shared/gpu/README.md). Without vLLM the vllm rows fail and the rest runs.
# Then, one device call per part, carrying .whl:
#     bash benchmarks/gpu_session.sh tests    # the CUDA tests (vLLM engine, offload, log-probs)
#     bash benchmarks/gpu_session.sh checks   # decode step hf vs vllm at batch 256, MFU, memory
#     bash benchmarks/gpu_session.sh cost     # Table 7 on the SmolLM2 shape, hf and vllm, TRL
#     bash benchmarks/gpu_session.sh zero     # DVPO and PPO under DeepSpeed ZeRO-2 and ZeRO-3
#     bash benchmarks/gpu_session.sh group5   # time per prompt: DVPO vs GRPO with 5 samples
# Each part writes $OUT/<part>.log (every command, its exit code and seconds) and
# $OUT/<part>.tgz (the benchmarks' JSON and markdown). A failing command does not stop the
# part; each has its own time limit (they leave room for the wheel install within one 600 s
# call), so what finished comes back.
set -u
part=${1:?usage: bash benchmarks/gpu_session.sh tests|checks|cost|zero|group5}
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
res=/tmp/gpu_results/$part
mkdir -p "$res"
log=$OUT/$part.log

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD TORCH_CUDA_ARCH_LIST=9.0 TORCH_EXTENSIONS_DIR=/tmp/torch_ext \
    MAX_JOBS=16 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1 \
    HF_HOME=/tmp/hf DVPO_LIGHTNING_CACHE=/tmp/dvpo_cache

step() {  # step SECONDS COMMAND...: run it under a time limit, log its exit code and time
    local limit=$1; shift
    echo "=== $(date +%T) $*" >>"$log"
    local t0=$SECONDS
    timeout "$limit" "$@" >>"$log" 2>&1
    echo "=== rc=$? after $((SECONDS - t0)) s" >>"$log"
}

{ nvidia-smi -L; python3 -c "import torch, transformers, lightning, deepspeed, trl; \
print(torch.__version__, transformers.__version__, lightning.__version__, \
deepspeed.__version__, trl.__version__)"; } >>"$log" 2>&1

case $part in
tests)
    step 480 python3 -m pytest -q -rs tests/test_vllm_engine.py tests/test_offload.py \
        tests/test_token_logps.py
    ;;
checks)
    step 240 python3 -m benchmarks.decode --shape smollm2-135m --batch_sizes 64 256 \
        --paths hf vllm --out "$res/decode"
    step 120 python3 -m benchmarks.mfu --shape qwen2.5-0.5b-like --batch 32 --seq 384 \
        --out "$res/mfu"
    step 60 python3 -m benchmarks.logps_memory --batch 32 --length 257 --vocab 151936 \
        --hidden 896 --out "$res/logps_memory"
    ;;
cost)
    step 520 python3 -m benchmarks.cost --mode gpu --shape smollm2-135m --prompts 64 --group 4 \
        --length 256 --rl_steps 3 --methods dvpo ppo grpo --generation hf vllm \
        --gradient_checkpointing --trl on --out "$res/cost"
    ;;
zero)
    for z in zero2 zero3; do
        step 250 python3 -m benchmarks.cost --mode gpu --shape smollm2-135m --prompts 16 \
            --group 4 --length 128 --rl_steps 3 --methods dvpo ppo --deepspeed "$z" \
            --out "$res/cost_$z"
    done
    ;;
group5)
    step 520 python3 -m benchmarks.cost --mode gpu --shape smollm2-135m --prompts 32 --group 5 \
        --length 256 --rl_steps 3 --methods dvpo ppo grpo --generation vllm \
        --gradient_checkpointing --trl off --out "$res/cost_group5"
    ;;
*)
    echo "unknown part $part (tests | checks | cost | zero | group5)" >&2
    exit 2
    ;;
esac
tar czf "$OUT/$part.tgz" -C "$res" .
tail -40 "$log"
