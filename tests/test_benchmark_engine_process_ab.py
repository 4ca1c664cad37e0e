"""The engine-in-the-process A/B benchmark's smoke run: both arms, interleaved, every field."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.engine_process_ab import ARMS, PHASES, main  # noqa: E402


@pytest.mark.filterwarnings("ignore")
def test_engine_process_ab_runs_both_arms_interleaved_and_writes_its_table(tmp_path):
    out = tmp_path / "ab"
    main(["--runs", "1", "--batch", "2", "--prompt_len", "4", "--response_len", "4",
          "--repeats", "1", "--out", str(out)])
    doc = json.loads((out / "engine_process_ab.json").read_text())
    assert [r["arm"] for r in doc["runs"]] == list(ARMS)  # A B (A B …)
    for r in doc["runs"]:
        assert all(r[ph] > 0 for ph in PHASES)
        assert (r["engine_build_s"] > 0) == (r["arm"] == "engine")
    assert all(doc["summary"]["ratio"][ph] > 0 for ph in PHASES)
    assert "engine ÷ no engine" in (out / "engine_process_ab.md").read_text()
