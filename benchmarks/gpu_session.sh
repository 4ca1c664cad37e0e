#!/usr/bin/env bash
# The GPU measurements as ONE device call of about 9 minutes (the device allows 600 s a command
# and 15 minutes a session, starts included), in priority order:
#   1. environment record (nvidia-smi, versions)                     -> session.log
#   2. cost per RL step: DVPO, PPO, GRPO on HF generate beside TRL's GRPOTrainer, SmolLM2-135M
#      shape, 64 prompts x 4 x 128 forced tokens                     -> cost/cost.{json,md}
#   3. policy-update MFU, SmolLM2-135M and Qwen2.5-0.5B shapes       -> mfu.jsonl
#   4. a short DVPO run under DeepSpeed ZeRO-2 (configs/deepspeed/zero2.yaml)
#                                                                    -> zero2/cost.{json,md}
#   5. only when `import vllm` works: decode step, hf vs vLLM        -> decode/decode.{json,md}
# Every step runs under `timeout` with its own cap, clipped to what is left of the session's
# budget (GPU_SESSION_BUDGET, 540 s, the wheel install included), so the call ends before the
# device's 600 s limit. Every result is written under $OUT while it is produced (cost.json after
# each method), so a step cut at its cap still returns what finished; at most 8 files (the
# device brings back 8). A failing step does not stop the next one; the script exits 1 if any
# step failed or was skipped for lack of time.
#
# On the GPU machine (benchmarks/README.md): the `run` tool with carry [".whl"] and
#     bash benchmarks/gpu_session.sh
# It installs .whl/*.whl (jsonargparse, deepspeed, trl, ...; the image has no network) itself.
# On CPU, the same script with tiny shapes in about a minute (tests/test_gpu_session.py):
#     DRY_RUN=1 OUT=/tmp/gpu_dry PYTHON=.venv/bin/python bash benchmarks/gpu_session.sh
# A dry run installs no wheels and needs no nvidia-smi; its ZeRO-2 step runs through the tests'
# DeepSpeed-over-gloo CPU strategy (Lightning's needs CUDA).
set -u
cd "$(dirname "$0")/.." || exit 2
DRY_RUN=${DRY_RUN:-0}
OUT=${OUT:-/tmp/gpu_out}
BUDGET=${GPU_SESSION_BUDGET:-540}
PY=${PYTHON:-python3}
SITE=${GPU_SESSION_SITE:-/tmp/site}
mkdir -p "$OUT"
log=$OUT/session.log
: >"$log"
start=$SECONDS
failed=0

say() { echo "=== $(date -u +%H:%M:%S) +$((SECONDS - start)) s: $*" | tee -a "$log"; }

step() {  # step NAME CAP COMMAND...: COMMAND under min(CAP, budget left); output to the log
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET - (SECONDS - start)))
    if ((left < 15)); then
        say "$name: skipped, ${left} s left of the ${BUDGET} s budget"
        failed=$((failed + 1))
        return 1
    fi
    ((cap > left)) && cap=$left
    say "$name (cap ${cap} s): $*"
    local t0=$SECONDS rc
    timeout -k 10 "$cap" "$@" >>"$log" 2>&1
    rc=$?
    local why=""
    ((rc == 124 || rc == 137)) && why=" (cut at its cap)"
    say "$name: rc=$rc after $((SECONDS - t0)) s$why"
    ((rc == 0)) || failed=$((failed + 1))
    return $rc
}

# --- 0. the wheels the image lacks (jsonargparse, deepspeed, trl, datasets, ...)
if [[ $DRY_RUN == 1 ]]; then
    say "wheels: dry run, none installed"
elif compgen -G ".whl/*.whl" >/dev/null; then
    step wheels 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$SITE" .whl/*.whl && export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    say "wheels: no .whl/*.whl here (carry [\".whl\"]), none installed"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TORCH_EXTENSIONS_DIR=/tmp/torch_ext \
    MAX_JOBS=16 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1 \
    HF_HOME=${HF_HOME:-/tmp/hf} DVPO_LIGHTNING_CACHE=${DVPO_LIGHTNING_CACHE:-/tmp/dvpo_cache}

if [[ $DRY_RUN == 1 ]]; then  # tiny shapes on CPU: seconds per step
    mode=(--mode cpu --shape tiny)
    # (two children at once: a dry run's timings are no measurement)
    cost_shape=(--prompts 2 --group 2 --length 4 --prompt_len 6 --rl_steps 2 --jobs 2)
    mfu_shapes=(tiny)
    mfu_args=(--batch 2 --seq 16 --warmup 1 --repeats 2 --matmul_size 128)
    decode_args=(--shape test --batch_sizes 2 --prompt_len 5 --new_tokens 4 --repeats 1
                 --copy_mib 8)
else
    # The image sets TORCH_CUDA_ARCH_LIST=9.0a, which DeepSpeed 0.19's op builder cannot parse.
    cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1)
    export TORCH_CUDA_ARCH_LIST=${cc:-9.0}
    mode=(--mode gpu --shape smollm2-135m)
    # TRL took 11 s a step at 64 x 4 x 256 on an H100 (8.7 s of it generating, 18-25 s more
    # for the first generate): at 128 tokens about 6 s a step, so each of the four processes
    # (imports, warm-up step, two timed steps) takes about a minute.
    cost_shape=(--prompts 64 --group 4 --length 128 --prompt_len 64 --rl_steps 3)
    mfu_shapes=(smollm2-135m qwen2.5-0.5b-like)
    mfu_args=(--batch 32 --seq 384 --warmup 3 --repeats 10)
    decode_args=(--shape smollm2-135m --batch_sizes 64 256)
fi

# --- 1. environment record
{
    [[ $DRY_RUN == 1 ]] || nvidia-smi || echo "nvidia-smi failed"
    echo "nproc $(nproc); $(free -g 2>/dev/null | sed -n 2p)"
    git rev-parse HEAD 2>/dev/null || echo "no .git here: the commit is the caller's"
} >>"$log" 2>&1
step env 30 "$PY" - <<'EOF'
import importlib
import platform
import sys

print("python", sys.version.split()[0], platform.platform())
for name in ("torch", "transformers", "lightning", "deepspeed", "trl", "jsonargparse",
             "datasets", "accelerate", "peft"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        print(name, f"MISSING ({type(e).__name__}: {e})")
import torch

print("torch cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", f"{p.total_memory / 2**30:.1f} GiB")
EOF

# --- 2. cost per RL step beside TRL (cost.json rewritten after each method)
step cost 270 "$PY" -m benchmarks.cost "${mode[@]}" "${cost_shape[@]}" \
    --methods dvpo ppo grpo --generation hf --trl on --out "$OUT/cost"

# --- 3. MFU of the policy update (one JSON line per shape)
for shape in "${mfu_shapes[@]}"; do
    step "mfu $shape" 40 "$PY" -m benchmarks.mfu --shape "$shape" "${mfu_args[@]}" \
        --out "/tmp/gpu_session_mfu/$shape" --append "$OUT/mfu.jsonl"
done

# --- 4. DVPO under DeepSpeed ZeRO-2 (a dry run: the tests' DeepSpeed-over-gloo CPU strategy)
if [[ $DRY_RUN == 1 ]]; then
    zero_shape=("${cost_shape[@]}")
else
    zero_shape=(--prompts 16 --group 4 --length 128 --prompt_len 64 --rl_steps 3)
fi
step zero2 100 "$PY" -m benchmarks.cost "${mode[@]}" "${zero_shape[@]}" --methods dvpo \
    --deepspeed zero2 --trl off --out "$OUT/zero2"

# --- 5. vLLM, only where it imports (and time is left)
left=$((BUDGET - (SECONDS - start)))
if ((left < 30)); then
    say "vllm: skipped, ${left} s left of the ${BUDGET} s budget"
elif timeout $((left < 60 ? left : 60)) "$PY" -c "import vllm" >>"$log" 2>&1; then
    step decode $((BUDGET - (SECONDS - start))) "$PY" -m benchmarks.decode "${decode_args[@]}" \
        --paths hf vllm --out "$OUT/decode"
else
    say "vllm: does not import here, its step skipped"
fi

say "done, $failed step(s) failed or skipped; in $OUT:"
(cd "$OUT" && find . -type f | sort | tee -a "$log")
for f in "$OUT/cost/cost.md" "$OUT/zero2/cost.md" "$OUT/decode/decode.md"; do
    [[ -f $f ]] && { echo "--- $f"; cat "$f"; }
done
[[ -f $OUT/mfu.jsonl ]] && { echo "--- $OUT/mfu.jsonl"; cat "$OUT/mfu.jsonl"; }
exit $((failed > 0))
