"""Two CPU processes (DDP over gloo) against one, on the same prompts.

Where the math says so the results must agree: with advantages whitened over *all* processes
and the loss normalised by the global token count, the per-prompt advantages and the
all-reduced gradient of the first update equal the single-process ones; the logged policy loss
averaged over ranks equals the single-process loss. Group estimators must never see a group
split across processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")


def _run(out: Path, devices: int, kind: str, task_data: str, art,
         engine: str = "hf") -> list[dict]:
    out.mkdir(parents=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(out), str(devices), kind, task_data,
         art.policy, art.gvm, art.reward_model, engine],
        env=env, capture_output=True, text=True, timeout=300)
    rank1_log = "\n".join(x for x in proc.stderr.splitlines() if "rank0" not in x)
    assert proc.returncode == 0, rank1_log[-6000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(devices)]


def _by_prompt(records: list[dict]) -> dict:
    rows = {}
    for rec in records:
        for i, p in enumerate(rec["prompts"]):
            m = rec["mask"][i]
            rows.setdefault(p, []).append(rec["advantages"][i][m])
    return rows


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_ddp_matches_single_process_dvpo(engine, tmp_path, task_data, artifacts, artifacts32):
    """With ``vllm`` each process drives its own colocated engine on its share of the prompts
    (built after the process group, its weights pushed from that rank's policy)."""
    art = artifacts32 if engine == "vllm" else artifacts
    one = _run(tmp_path / "one", 1, "gvm", task_data, art, engine)
    two = _run(tmp_path / "two", 2, "gvm", task_data, art, engine)
    assert two[0]["world_size"] == 2 and len(two) == 2
    a1, a2 = _by_prompt(one), _by_prompt(two)
    assert set(a1) == set(a2) and len(a1) == 8, "both runs must see the same 8 prompts"
    assert not set(two[0]["prompts"]) & set(two[1]["prompts"]), "ranks must split the prompts"
    for p in a1:
        torch.testing.assert_close(a2[p][0], a1[p][0], rtol=1e-5, atol=1e-5)
    # whitened over all processes: zero mean, unit variance over the union of the ranks
    allv = torch.cat([v[0] for v in a2.values()])
    assert abs(float(allv.mean())) < 1e-5 and abs(float(allv.std()) - 1) < 1e-2
    # each rank's own advantages are NOT whitened on their own (else this test proves nothing)
    local = torch.cat([r["advantages"][r["mask"]] for r in two[:1]])
    assert abs(float(local.mean())) > 1e-4
    torch.testing.assert_close(two[0]["grad"], one[0]["grad"], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(two[1]["grad"], two[0]["grad"])
    loss_two = sum(r["policy_loss"] for r in two) / 2
    assert loss_two == pytest.approx(one[0]["policy_loss"], rel=1e-4, abs=1e-7)


def test_ddp_never_splits_groups(tmp_path, task_data, artifacts):
    two = _run(tmp_path / "grpo", 2, "grpo", task_data, artifacts)
    for rec in two:
        by_group: dict[int, set] = {}
        for g, p in zip(rec["group_ids"], rec["prompts"]):
            by_group.setdefault(g, set()).add(p)
        assert all(len(ps) == 1 for ps in by_group.values())
        assert sorted(rec["group_ids"]) == [g for g in range(len(by_group)) for _ in range(2)]
    assert not set(two[0]["prompts"]) & set(two[1]["prompts"])
