"""Measure the sampler probe's gap: healthy vs one skipped push (docs/reliability.md).

Not collected by default (no ``test_`` file prefix); run it with
``python -m pytest -s -q tests/calibrate_sampler_gap.py`` (about 10 min on 2 CPU cores).
Per (trainer precision, engine dtype, full / LoRA): a 4-RL-step run with the real CPU vLLM
engine, one optimizer step per rollout, the push before RL step 3 read and dropped by the
engine; prints the per-step mean |Δ log p| (step 3: one update behind).
"""

from __future__ import annotations

import json

import pytest
import vllm
from lightning.pytorch import Callback
from test_rl_training import make_cli

from dvpo_lightning.rollout.vllm_engine import VLLMEngine

SKIP_VERSION = 2  # the push before RL step 3 (one optimizer update per RL step)


class Gaps(Callback):
    def __init__(self) -> None:
        self.gaps: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.gaps.append(float(trainer.callback_metrics["rollout/sampler_logp_diff_mean"]))


def skip_one_push(monkeypatch, version: int) -> None:
    """The engine reads the push at ``version`` and loads nothing (the weights stay old)."""
    state = {"skip": False}
    ready, rpc = VLLMEngine._ready, vllm.LLM.collective_rpc

    def _ready(self, model, weights_version):
        state["skip"] = weights_version == version
        return ready(self, model, weights_version)

    def collective_rpc(self, method, *args, **kwargs):
        if method == "reload_weights" and state["skip"]:
            for _ in kwargs["kwargs"]["weights_iterator"]:
                pass
            return [None]
        return rpc(self, method, *args, **kwargs)

    monkeypatch.setattr(VLLMEngine, "_ready", _ready)
    monkeypatch.setattr(vllm.LLM, "collective_rpc", collective_rpc)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("lora", [False, True])
def test_measure(precision, dtype, lora, artifacts32, task_data, tmp_path, monkeypatch):
    extra = ["--model.init_args.rollout.engine=vllm",
             "--model.init_args.rollout.vllm.logp_tolerance=1e9",
             "--model.init_args.rollout.vllm.push_check=false",
             f"--model.init_args.rollout.vllm.dtype={dtype}",
             f"--trainer.precision={precision}",
             "--model.init_args.lr=" + ("1e-4" if lora else "5e-5")]
    if lora:
        extra.append("--model.init_args.models.lora.r=8")
    cli, _ = make_cli("dvpo", tmp_path, artifacts32, task_data, *extra, rl_steps=4,
                      ppo_epochs=1, n_minibatches=1)
    skip_one_push(monkeypatch, SKIP_VERSION)
    gaps = Gaps()
    cli.trainer.callbacks.append(gaps)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    print("\nCALIBRATION", json.dumps({"precision": precision, "engine": dtype, "lora": lora,
                                       "healthy": [gaps.gaps[i] for i in (0, 1, 3)],
                                       "stale": gaps.gaps[2]}))
