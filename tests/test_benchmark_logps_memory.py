"""The log-prob memory benchmark: a CPU smoke run writes every mode's figures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.logps_memory import main  # noqa: E402


def test_cpu_smoke_run_writes_every_mode(tmp_path):
    out = tmp_path / "lm"
    r = main(["--batch", "2", "--length", "9", "--vocab", "512", "--device", "cpu",
              "--out", str(out)])
    assert [row["mode"] for row in r["rows"]] == ["plain", "chunked", "fused"]
    for row in r["rows"]:
        assert row["peak_extra_gb"] >= 0 and row["seconds"] > 0
        assert row["logits_gb"] == 2 * 9 * 512 * 2 / 2**30
    assert json.loads((out / "logps_memory.json").read_text())["vocab"] == 512
    assert "chunked ÷ plain" in (out / "logps_memory.md").read_text()
