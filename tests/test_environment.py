"""The environment record (dvpo_lightning.runtime.environment): what it reports matches what
torch, importlib.metadata, git and the process environment say."""

import importlib.metadata
import json
import subprocess

import pytest
import torch

from dvpo_lightning.runtime.environment import (
    KERNEL_ENV_VARS,
    describe_environment,
    environment_markdown,
    git_state,
    mkl_dispatch,
    packages_digest,
    parse_cpuinfo,
)


@pytest.fixture(scope="module")
def env():
    return describe_environment()


def test_json_able(env):
    assert json.loads(json.dumps(env)) == env


def test_torch_facts_are_torchs(env):
    t = env["torch"]
    assert t["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert t["cpu_capability"] in ("DEFAULT", "VSX", "ZVECTOR", "SVE256", "AVX2", "AVX512")
    assert t["version"] == torch.__version__
    assert t["num_threads"] == torch.get_num_threads()
    assert t["num_interop_threads"] == torch.get_num_interop_threads()
    assert t["mkl"] == torch.backends.mkl.is_available()
    if t["mkl"]:  # the version parsed from torch.__config__.show(), the path from MKL_VERBOSE
        assert t["mkl_version"] and t["mkl_version"][0].isdigit()
        assert "CNR:" in t["mkl_dispatch"]  # (the ISA's wording varies with the CPU)
    assert env["cpu"]["count"] > 0


def test_package_versions_are_installed_ones(env):
    pkgs = env["packages"]
    assert pkgs["torch"] == importlib.metadata.version("torch")
    # PyPI's CUDA torch (the GPU image's 2.11) is distribution 2.11.0 and __version__
    # 2.11.0+cu130; the lock's CPU build has +cpu in both: the local tag may be only in the latter.
    assert env["torch"]["version"].split("+")[0] == pkgs["torch"].split("+")[0]
    assert pkgs["transformers"] == importlib.metadata.version("transformers")
    assert list(pkgs) == sorted(pkgs, key=str.lower)
    assert env["packages_digest"] == packages_digest(pkgs)


def test_digest_changes_with_any_version():
    pkgs = {"torch": "2.13.0+cpu", "numpy": "2.4.6", "transformers": "5.24.0"}
    base = packages_digest(pkgs)
    assert len(base) == 12 and int(base, 16) >= 0
    assert packages_digest(dict(reversed(pkgs.items()))) == base  # order does not count
    assert packages_digest({**pkgs, "numpy": "2.4.7"}) != base
    assert packages_digest({**pkgs, "pyyaml": "6.0.4"}) != base
    assert packages_digest({k: v for k, v in pkgs.items() if k != "numpy"}) != base


def test_kernel_env_vars_are_picked_up(monkeypatch):
    for name in KERNEL_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.setenv("MKL_CBWR", "AVX2")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    env = describe_environment(probe_mkl=False)
    assert env["torch"]["mkl_dispatch"] is None
    assert env["env"]["ATEN_CPU_CAPABILITY"] == "avx2"
    assert env["env"]["MKL_CBWR"] == "AVX2"
    assert env["env"]["OMP_NUM_THREADS"] == "2"
    assert env["env"]["ONEDNN_MAX_CPU_ISA"] is None
    md = environment_markdown(env)
    assert "`ATEN_CPU_CAPABILITY=avx2`" in md and "`MKL_CBWR=AVX2`" in md
    assert "ONEDNN_MAX_CPU_ISA" not in md


def test_markdown_has_kernels_threads_and_key_packages(env):
    md = environment_markdown(env)
    assert md.startswith("## Environment")
    assert f"kernels {env['torch']['cpu_capability']}" in md
    assert f"{torch.get_num_threads()} threads" in md
    assert f"**torch** {torch.__version__}:" in md
    assert f"torch {importlib.metadata.version('torch')}" in md
    assert f"transformers {importlib.metadata.version('transformers')}" in md
    assert env["packages_digest"] in md
    assert len(md.splitlines()) < 12  # the key lines, not every package


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="torch built without MKL")
def test_mkl_dispatch_sees_mkl_cbwr(monkeypatch):
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")  # read by MKL in the child process
    assert mkl_dispatch().endswith("CNR:COMPATIBLE")


def test_parse_cpuinfo_keeps_kernel_flags():
    text = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
            "flags\t\t: fpu sse2 avx avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile\n\n"
            "processor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n")
    info = parse_cpuinfo(text)
    assert info["model"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert info["flags"] == ["avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"]
    assert parse_cpuinfo("") == {"model": None, "flags": []}


def test_git_state(tmp_path):
    assert git_state(tmp_path) == {"commit": None, "dirty": None}  # not a repository
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "a.txt").write_text("1")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "a"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()
    assert git_state(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "a.txt").write_text("2")
    assert git_state(tmp_path) == {"commit": head, "dirty": True}
    env = describe_environment(tmp_path, probe_mkl=False)
    assert env["git"]["commit"] == head
    assert f"{head[:12]} (with uncommitted changes)" in environment_markdown(env)
