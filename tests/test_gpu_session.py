"""benchmarks/gpu_session.sh's dry run: the one-call GPU script, end to end on CPU with tiny
shapes and without vLLM (as on the GPU image), brings its results back in $OUT."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HAS_TRL = importlib.util.find_spec("trl") is not None


def test_gpu_session_dry_run_writes_every_result_into_out(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(out), "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf"),
           "DVPO_LIGHTNING_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": str(ROOT / "tests" / "no_vllm"),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    log = (out / "session.log").read_text()
    # every step ran (or was skipped with its reason), in priority order, each with its rc
    for line in ("env: rc=0", "cost: rc=", "mfu tiny: rc=0", "zero2: rc=0",
                 "vllm: does not import here"):
        assert line in log, (line, proc.stdout[-3000:])
    assert log.index("env: rc") < log.index("cost: rc") < log.index("mfu tiny: rc") \
        < log.index("zero2: rc")
    assert "cost: rc=0" in log or not HAS_TRL, log[-3000:]  # (the TRL row fails without TRL)
    assert proc.returncode == (0 if HAS_TRL else 1), proc.stdout[-3000:]
    # what comes back: at most the 8 files the device returns, the hf rows among them
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["cost/cost.json", "cost/cost.md", "mfu.jsonl", "session.log",
                     "zero2/cost.json", "zero2/cost.md"]
    zero2 = json.loads((out / "zero2" / "cost.json").read_text())
    assert [(r["method"], r["status"]) for r in zero2["methods"]] == [("dvpo", "ok")]
    assert zero2["methods"][0]["step_s"] > 0
    doc = json.loads((out / "cost" / "cost.json").read_text())
    rows = {(r["method"], r["engine"]): r for r in doc["methods"]}
    assert set(rows) == {("dvpo", "hf"), ("ppo", "hf"), ("grpo", "hf")}
    assert all(r["status"] == "ok" and r["step_s"] > 0 for r in rows.values())
    if HAS_TRL:
        assert doc["trl"]["status"] == "ok" and rows[("dvpo", "hf")]["throughput_ratio_to_trl"] > 0
    assert "| dvpo | hf |" in (out / "cost" / "cost.md").read_text()
    mfu = [json.loads(line) for line in (out / "mfu.jsonl").read_text().splitlines()]
    assert [r["shape"] for r in mfu] == ["tiny"] and mfu[0]["mfu"] > 0
    assert "python " in log and "torch " in log  # the environment record
