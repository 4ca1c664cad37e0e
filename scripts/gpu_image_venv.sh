#!/usr/bin/env bash
# Build, on a CPU machine, a scratch environment with the lent GPU machine's versions, so that
# version drift (an API the image's torch 2.11 or transformers 5.17 lacks, another default)
# shows up before a GPU minute is spent (docs/gpu.md says what was found with it).
#
#   bash scripts/gpu_image_venv.sh [DIR]     # default DIR: /tmp/dvpo-gpu-image
#   . DIR/env.sh && $PY -m pytest -q tests/test_deepspeed_cpu.py
#   bash scripts/gpu_image_venv.sh --wheels  # only fill ./.whl, the wheels a GPU run carries
#
# It installs what the GPU run will have, the same way:
# - DIR/venv: Python 3.12 with the image's packages, requirements/gpu-image.txt (--no-deps: a
#   whole resolved set). PyPI's torch 2.11.0 is the image's CUDA 13 build; it runs on CPU.
#   No vLLM, as on the image.
# - ./.whl: the carried wheels, requirements/gpu-carry.txt, fetched for Python 3.12 (deepspeed
#   built as a pure-Python wheel). A .whl that already holds wheels is used as it is.
# - DIR/site: those wheels installed with the GPU run's own command (pip --target, no index,
#   no deps), and DIR/env.sh puts DIR/site and the source tree on PYTHONPATH, as the GPU run
#   does: the project itself is not pip-installed.
# Needs Python 3.12 (python3.12 on PATH, PYTHON312=..., or pyenv) and about 5.3 GB of disk (the
# CUDA libraries torch 2.11 depends on). Took 4 min 18 s on the project's machine (2026-12-06).
set -euo pipefail
dir=$(realpath -m -- "${1:-/tmp/dvpo-gpu-image}")  # (relative to where it was called from)
cd "$(dirname "$0")/.."
repo=$PWD
mkdir -p .whl
if ! ls .whl/*.whl >/dev/null 2>&1; then
    syspip=("${PYTHON:-python3}" -m pip)
    "${syspip[@]}" wheel -q --no-deps "$(grep '^deepspeed==' requirements/gpu-carry.txt)" -w .whl
    "${syspip[@]}" download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl \
        -r <(grep -v -e '^#' -e '^deepspeed==' requirements/gpu-carry.txt)
fi
echo "gpu_image_venv: $(ls .whl/*.whl | wc -l) carried wheels, $(du -sm .whl | cut -f1) MiB in .whl"
[ "${1:-}" = --wheels ] && exit 0
case $dir in "$repo"|"$repo"/*)
    echo "gpu_image_venv: DIR=$dir is inside the repository; a GPU run carries the working" \
         "tree (64 MiB at most), so put the venv elsewhere (e.g. /tmp/dvpo-gpu-image)" >&2
    exit 2 ;;
esac
py312=${PYTHON312:-}
if [ -z "$py312" ]; then
    if command -v python3.12 >/dev/null && python3.12 -V >/dev/null 2>&1; then
        py312=python3.12
    elif command -v pyenv >/dev/null && [ -n "$(pyenv versions --bare | grep '^3\.12' | tail -1)" ]
    then
        py312=$(pyenv root)/versions/$(pyenv versions --bare | grep '^3\.12' | tail -1)/bin/python3
    else
        echo "gpu_image_venv: the GPU image runs Python 3.12 and none was found; install it or" \
             "set PYTHON312=/path/to/python3.12" >&2
        exit 2
    fi
fi
mkdir -p "$dir"
[ -x "$dir/venv/bin/python" ] || "$py312" -m venv "$dir/venv"
pip=("$dir/venv/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip
"${pip[@]}" install -q --no-deps -r requirements/gpu-image.txt
"${pip[@]}" check

rm -rf "$dir/site"
# The GPU run's install line, with DIR/site for /tmp/site.
"${pip[@]}" install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$dir/site" .whl/*.whl

cat > "$dir/env.sh" <<EOF
# Source from the repository root: the GPU run's environment (docs/gpu.md), with $dir/site
# for /tmp/site. \$PY is the image-like Python.
export PYTHONPATH=$dir/site:\$PWD TORCH_CUDA_ARCH_LIST=9.0 TORCH_EXTENSIONS_DIR=$dir/torch_ext \\
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1 \\
    HF_HOME=\$(mktemp -d)
PY=$dir/venv/bin/python
EOF
# shellcheck disable=SC1091
. "$dir/env.sh"
"$PY" - <<'EOF'
import importlib
import importlib.util

for name in ("torch", "transformers", "lightning", "accelerate", "peft", "deepspeed",
             "jsonargparse", "datasets", "wandb", "trl", "gguf", "dvpo_lightning"):
    mod = importlib.import_module(name)
    print(f"gpu_image_venv: {name} {getattr(mod, '__version__', '')} from {mod.__file__}")
assert importlib.util.find_spec("vllm") is None, "vLLM is not on the GPU image"
EOF
echo "gpu_image_venv: ready; from the repository root: . $dir/env.sh && \$PY -m pytest -q ..."
