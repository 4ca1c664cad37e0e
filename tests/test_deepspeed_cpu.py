"""DeepSpeed ZeRO-2 and ZeRO-3 on CPU (through a test-only strategy) against the plain
strategy: one DVPO update from the same greedy rollout must give the same weights.

Under ZeRO-3 the policy's parameters are partitioned (asserted), so generation, log-probs and
the update all run on sharded weights. (Generation would also work without the explicit
gather of ``rollout/zero3.py`` — DeepSpeed's hooks gather per layer — so this does not test
that optimisation, only that it gives the same result.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dvpo_lightning.models import load_causal_lm, load_tokenizer

WORKER = Path(__file__).with_name("deepspeed_worker.py")


def _run(tmp_path: Path, strategy: str, task_data: str, art, devices: int = 1,
         engine: str = "hf") -> dict:
    out = tmp_path / f"{strategy}-{devices}-{engine}"
    out.mkdir()
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                  str(Path.home() / ".cache" / "torch_extensions"))}
    proc = subprocess.run([sys.executable, str(WORKER), str(out), strategy, task_data,
                           art.policy, art.gvm, str(devices), engine],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return torch.load(out / "result.pt")


@pytest.fixture(scope="module")
def plain(tmp_path_factory, task_data, artifacts) -> dict:
    return _run(tmp_path_factory.mktemp("plain"), "plain", task_data, artifacts)


@pytest.mark.parametrize("stage", ["2", "3"])
def test_zero_matches_plain_strategy(stage, plain, tmp_path, task_data, artifacts):
    zero = _run(tmp_path, stage, task_data, artifacts)
    assert plain["steps"] == zero["steps"] == 1
    assert zero["partitioned"] == (stage == "3")
    policy = load_causal_lm(artifacts.policy, load_tokenizer(artifacts.policy))
    start = policy.state_dict()
    moved = [k for k in plain["state"] if not torch.equal(plain["state"][k],
                                                          start[k.removeprefix("policy.")])]
    assert len(moved) == len(start), "the plain run must change every policy tensor"
    for k, v in plain["state"].items():
        torch.testing.assert_close(zero["state"][k], v, rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("stage", ["2", "3"])
def test_two_process_zero_matches_one_plain_process(stage, plain, tmp_path, task_data,
                                                   artifacts):
    """Two ranks of 2 prompts each under ZeRO (gloo) make the same update as one plain process
    on the 4 prompts: the loss is normalised by the global token count, so DeepSpeed's
    gradient average equals the single-process gradient."""
    zero = _run(tmp_path, stage, task_data, artifacts, devices=2)
    assert zero["steps"] == 1 and zero["partitioned"] == (stage == "3")
    assert zero["world_size"] == 2 and plain["world_size"] == 1
    for k, v in plain["state"].items():
        torch.testing.assert_close(zero["state"][k], v, rtol=1e-4, atol=1e-6, msg=k)


def test_two_process_zero3_with_vllm_equals_generate(tmp_path, task_data, artifacts32):
    """Under ZeRO-3 each of two ranks drives its own vLLM engine, fed the gathered (full)
    weights of its partitioned policy: greedy rollouts in float32 equal ``generate``'s, so the
    update is bit for bit the one the same two ranks make with ``generate`` (which the tests
    above hold to one plain process's)."""
    hf = _run(tmp_path, "3", task_data, artifacts32, devices=2, engine="hf")
    vllm = _run(tmp_path, "3", task_data, artifacts32, devices=2, engine="vllm")
    assert vllm["steps"] == 1 and vllm["partitioned"] and vllm["world_size"] == 2
    for k, v in hf["state"].items():
        assert torch.equal(vllm["state"][k], v), k
