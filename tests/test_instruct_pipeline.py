"""The instruction setting end to end on CPU: ``configs/instruct/pipeline_smoke.yaml`` as shipped.

SmolLM2-135M-Instruct (the packaged GGUF) samples responses to constraint-carrying prompts under
four behaviour policies, the judge scores them, the reward model and the GVM train on them with
LoRA, DVPO, PPO, GRPO and ReMax each run two RL steps from the instruct model with LoRA
(reference = adapters off) and DPO two updates on the same pairs, all judged on held-out
prompts; then the report. The run's own files
are checked: the judge's scores, the LoRA exports and the report's tables.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import requires_smollm2
from transformers import AutoModelForCausalLM

from dvpo_lightning.models.named import resolve_model
from dvpo_lightning.tasks import get_task

REPO = Path(__file__).resolve().parents[1]
METHODS = ("dvpo", "ppo", "grpo", "remax", "dpo")
pytestmark = [
    requires_smollm2,
    pytest.mark.filterwarnings("ignore"),
    pytest.mark.slow,
]


def test_instruct_smoke_pipeline_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    # The README's command, in a process of its own (its W&B service must not outlive it in
    # the test session); its stages in that one process to save start-up time, on every core
    # (a 135M model gains from each: 5 min 20 s on one thread, 3 min 39 s on two, 2 cores).
    proc = subprocess.run(
        [sys.executable, "-m", "dvpo_lightning", "pipeline", "--config",
         "configs/instruct/pipeline_smoke.yaml", "--in_process", "true"],
        env={**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1),
             "PYTHONWARNINGS": "ignore"},
        capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-6000:])
    summary = [line for line in proc.stdout.splitlines() if line.startswith("[pipeline] data ")]
    assert summary and summary[-1].count(" ran (") == 9, summary  # data, 2 stages, 5 runs, report

    # the data: judged samples of the real model, disjoint prompt splits, pairs by score
    data = tmp_path / "data/instruct_smoke"
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["counts"]["pairs"] > 0 and manifest["counts"]["eval_pairs"] > 0
    judge = get_task("instruct")
    rows = [json.loads(line) for line in (data / "trajectories.jsonl").open()]
    assert {r["policy"] for r in rows} <= set(manifest["args"]["behaviour_policies"])
    for r in rows:  # the stored score is the judge's score of the stored text
        assert r["score"] == r["gold"] == judge.gold_score(r["prompt"], r["response"],
                                                           r["finished"])
    prompts = {name: {json.loads(line)["prompt"] for line in (data / f"{name}.jsonl").open()}
               for name in ("rl_prompts", "eval_prompts")}
    assert not prompts["rl_prompts"] & {r["prompt"] for r in rows}
    assert not prompts["rl_prompts"] & prompts["eval_prompts"]

    runs = tmp_path / "runs/instruct_smoke"
    for stage in ("reward_model", "gvm"):
        acc = json.loads((runs / stage / "summary.json").read_text())
        assert acc["pairs"] == manifest["counts"]["eval_pairs"]
        assert (runs / stage / "model/value_head.safetensors").exists()

    base = AutoModelForCausalLM.from_pretrained(resolve_model(manifest["model"]))
    x = torch.tensor([[1, 2, 3, 4, 5]])
    for m in METHODS:
        art = runs / m / "seed0/model"
        summary = json.loads((art / "dvpo_artifact.json").read_text())["summary"]
        assert summary["rl_steps"] == 2, m
        ref, final = summary["reference_eval"], summary["final_eval"]
        assert 0.0 <= ref["gold_reward"] <= 1.0 and ref["kl_to_ref"] == 0.0, m
        # (k1 KL on 4 prompts' own samples: unbiased, but a small sample can be below 0)
        assert 0.0 <= final["eval/gold_reward"] <= 1.0 and math.isfinite(final["eval/kl_to_ref"])
        assert 0.0 <= final["eval/win_rate_vs_ref"] <= 1.0, m
        assert summary["cost"]["step_s"] > 0
        # LoRA: the adapter and the merged policy, which moved away from the instruct model
        assert (art / "adapter/adapter_config.json").exists(), m
        exported = AutoModelForCausalLM.from_pretrained(str(art))
        with torch.no_grad():
            assert not torch.equal(exported(x).logits, base(x).logits), m
    assert (runs / "ppo/seed0/model/critic/value_head.safetensors").exists()

    md = (runs / "report/report.md").read_text()
    for m in METHODS:
        assert f"| {m}" in md.lower(), m
