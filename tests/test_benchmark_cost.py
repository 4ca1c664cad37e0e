"""The cost benchmark's CPU smoke run: every method, every field, forced lengths, ratios."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.cost import FIELDS, METHODS, main  # noqa: E402


@pytest.mark.filterwarnings("ignore")
def test_cpu_cost_benchmark_writes_every_field_for_every_method(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    out = tmp_path / "cost"
    main(["--mode", "cpu", "--rl_steps", "2", "--length", "4", "--prompts", "2", "--group", "2",
          "--prompt_len", "6", "--out", str(out)])
    doc = json.loads((out / "cost.json").read_text())
    assert doc["meta"]["responses_per_step"] == 4 and doc["meta"]["length"] == 4
    records = {r["method"]: r for r in doc["methods"]}
    assert set(records) == set(METHODS)
    for m, r in records.items():
        for f in FIELDS:
            assert isinstance(r[f], float) and r[f] >= 0, (m, f)
        # the same batch for every method: 4 responses of exactly 4 tokens (EOS suppressed)
        assert r["gen_tokens_per_step"] == 16.0, m
        assert r["rl_steps"] == 2
    assert records["ppo"]["time_ratio_to_ppo"] == 1.0
    # PPO trains a critic as large as the policy; the others train the policy only
    assert records["ppo"]["params_trained_m"] == pytest.approx(
        2 * records["dvpo"]["params_trained_m"], rel=0.01)
    md = (out / "cost.md").read_text()
    assert all(f"| {m} |" in md for m in METHODS)
    assert os.path.getsize(out / "cost.md") > 200
