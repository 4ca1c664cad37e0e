"""The decode benchmark's CPU smoke run: both paths (HF generate and vLLM), every field present and
positive."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.decode import FIELDS, PATHS, main  # noqa: E402


@pytest.mark.filterwarnings("ignore")
def test_cpu_decode_benchmark_writes_every_field(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "decode"
    main(["--shape", "test", "--device", "cpu", "--batch_sizes", "2", "3", "--prompt_len", "5",
          "--new_tokens", "4", "--repeats", "1", "--copy_mib", "8", "--ops", "4",
          "--out", str(out)])
    doc = json.loads((out / "decode.json").read_text())
    meta = doc["meta"]
    assert meta["shape"] == "test" and meta["new_tokens"] == 4 and meta["prompt_len"] == 5
    assert meta["threads"] >= 1 and meta["cpu_flags"]
    records = doc["records"]
    assert sorted((r["batch_size"], r["path"]) for r in records) == sorted(
        (b, p) for b in (2, 3) for p in PATHS)
    for r in records:
        for f in FIELDS:
            assert isinstance(r[f], (int, float)) and r[f] > 0, (r["path"], f, r.get(f))
        assert r["graphs_compiled_while_timed"] == 0
        if r["path"] == "vllm":
            assert r["speedup_vs_hf"] > 0 and r["total_speedup_vs_hf"] > 0
    by = {(r["batch_size"], r["path"]): r for r in records}
    # the floor grows with the batch (more KV bytes), the weights do not
    assert by[(3, "hf")]["kv_bytes_per_step"] == pytest.approx(
        1.5 * by[(2, "hf")]["kv_bytes_per_step"])
    assert by[(3, "hf")]["weight_bytes"] == by[(2, "vllm")]["weight_bytes"]
    md = (out / "decode.md").read_text()
    assert "| 2 | hf |" in md and "| 3 | vllm |" in md and "floor" in md
    # --ops: the hf generation's costliest operators, their shares of all operators' time
    for r in records:
        ops = r.get("ops", [])
        assert len(ops) == (4 if r["path"] == "hf" else 0), r["path"]
        assert [o["self_s"] for o in ops] == sorted((o["self_s"] for o in ops), reverse=True)
        assert all(0 < o["share"] <= 1 and o["calls"] >= 1 for o in ops)
        assert not ops or 0 < sum(o["share"] for o in ops) <= 1 + 1e-9
    assert "aten::mm" in {o["op"] for o in by[(2, "hf")]["ops"]}  # the weights' products
    assert "Where one whole hf generation's time goes, batch 2" in md


def test_cpu_decode_benchmark_keeps_the_hf_rows_when_vllm_fails(tmp_path):
    """hf is timed before the vLLM engine exists: without vLLM (tests/no_vllm hides it) the hf
    rows are written, the vllm rows carry the error, and the command exits non-zero after
    writing."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "no_vllm"), str(ROOT)])}
    out = tmp_path / "decode"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.decode", "--shape", "test", "--device", "cpu",
         "--batch_sizes", "2", "--prompt_len", "5", "--new_tokens", "4", "--repeats", "1",
         "--copy_mib", "8", "--threads", "1", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "1 row(s) failed" in proc.stderr, proc.stderr[-2000:]
    records = {r["path"]: r for r in json.loads((out / "decode.json").read_text())["records"]}
    assert set(records) == set(PATHS)
    assert records["hf"]["status"] == "ok"
    assert all(records["hf"][f] > 0 for f in FIELDS)
    assert records["vllm"]["status"] == "failed"
    assert "not installed" in records["vllm"]["error"]  # (the engine's own message)
    md = (out / "decode.md").read_text()
    assert "| 2 | hf | " in md and "| 2 | vllm | failed: " in md
