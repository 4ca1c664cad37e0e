#!/usr/bin/env bash
# The instruction setting's CPU first look (configs/instruct/pipeline_cpu.yaml's DVPO run:
# SmolLM2-135M-Instruct, LoRA r 16, fp32, 16 responses x 48 new tokens, 1 PPO epoch of one
# mini-batch) timed per phase with HF generate and with vLLM, one after the other.
# The GVM is the instruct model's body with a fresh value head (the trained GVM's shape; its
# weights do not change the time). Run from a clone's root:
#   bash benchmarks/instruct_engine.sh        (STEPS=7 RL steps per engine; the first is warm-up)
# Each run's per-step phase seconds: runs/instruct_time/<engine>/summary.json ("cost",
# "train_curve"); docs/instruct.md has the figures.
set -euo pipefail
tmp=$(mktemp --suffix=.yaml)
trap 'rm -f "$tmp"' EXIT
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
PY=${PY:-.venv/bin/python}
cat > "$tmp" <<'YAML'
task: instruct
out: data/instruct_time
model: smollm2-135m-instruct
n_trajectory_prompts: 8
max_new_tokens: 16
n_rl_prompts: 480
n_eval_prompts: 48
n_eval_pair_prompts: 8
batch_size: 32
YAML
[ -f data/instruct_time/rl_prompts.jsonl ] || $PY -m dvpo_lightning data --config "$tmp"
mkdir -p runs
steps=${STEPS:-7}
for engine in ${ENGINES:-hf vllm}; do
  start=$(date +%s)
  $PY -m dvpo_lightning fit --config configs/instruct/dvpo.yaml \
    --trainer.precision=32-true --trainer.accelerator=cpu --trainer.max_steps=$steps \
    --trainer.limit_val_batches=0 --trainer.logger=false \
    --trainer.default_root_dir=runs/instruct_time/$engine \
    --model.init_args.export_dir=null \
    --model.init_args.value_model=smollm2-135m-instruct \
    --model.init_args.optim.lr=2.0e-4 \
    --model.init_args.rollout.max_new_tokens=48 --model.init_args.rollout.engine=$engine \
    --model.init_args.ppo.epochs=1 --model.init_args.ppo.mini_batch_size=16 \
    --data.init_args.train_path=data/instruct_time/rl_prompts.jsonl \
    --data.init_args.eval_path=data/instruct_time/eval_prompts.jsonl \
    --data.init_args.tokenizer=data/instruct_time/tokenizer \
    --data.init_args.max_eval_prompts=32 --data.init_args.batch_size=16 \
    > runs/instruct_time_$engine.log 2>&1
  echo "$engine: $(( $(date +%s) - start )) s"
done
