"""The policy-update MFU benchmark: its FLOP count by hand, and a CPU smoke run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from transformers import LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.mfu import main, model_flops  # noqa: E402


def test_model_flops_by_hand():
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=256, vocab_size=512)
    # per layer: q 64·64 + k,v 2·64·32 + o 64·64 + mlp 3·64·256 = 61440; ×4 + head 64·512
    n = 4 * 61440 + 64 * 512
    attention = 12 * 4 * 64 * 10 * 10 * 2 / 2
    assert model_flops(cfg, batch=2, seq=10) == 6 * n * 2 * 10 + attention
    # the head over 4 of the 10 positions: 6 of them lose 6 · 64 · 512 FLOPs per row
    assert model_flops(cfg, batch=2, seq=10, head_positions=4) == (
        6 * n * 2 * 10 + attention - 6 * 64 * 512 * 2 * 6)


def test_cpu_smoke_run_writes_every_field(tmp_path):
    out = tmp_path / "mfu"
    main(["--shape", "tiny", "--batch", "2", "--seq", "16", "--warmup", "1", "--repeats", "2",
          "--matmul_size", "256", "--out", str(out)])
    r = json.loads((out / "mfu.json").read_text())
    for k in ("step_s", "tokens_per_s", "achieved_tflops", "matmul_ceiling_tflops", "mfu"):
        assert r[k] > 0, k
    assert r["tokens_per_s"] == 2 * 16 / r["step_s"]
    assert r["fused_head"] and r["head_positions"] == 16 - 16 // 3  # the response's T columns
    assert "| MFU |" in (out / "mfu.md").read_text()
