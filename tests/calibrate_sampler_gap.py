"""Measure the sampler probe's gap: healthy vs one skipped push (docs/reliability.md).

Not collected by default (no ``test_`` file prefix); run it with
``python -m pytest -s -q tests/calibrate_sampler_gap.py`` (2 min for the tiny model, 10 min for
SmolLM2 on 2 CPU cores). Per (trainer precision, engine dtype — ``auto`` resolved by the
precision, as a run resolves it — full / LoRA), ``test_measure``: a 4-RL-step run with the real
CPU vLLM engine, one optimizer step per rollout, the push before RL step 3 read and dropped by
the engine; prints the per-step mean and max |Δ log p| per token (step 3: one update behind).
``test_measure_smollm2``: the same gaps on SmolLM2-135M-Instruct, engine and trainer under the
precision's autocast or in its dtype, as Lightning runs them.
"""

from __future__ import annotations

import json

import pytest
from conftest import requires_smollm2
from lightning.pytorch import Callback
from test_rl_training import make_cli
from test_vllm_push import skip_one_push

from dvpo_lightning.rollout.tolerance import engine_dtype
from dvpo_lightning.rollout.vllm_engine import VLLMEngine

SKIP_VERSION = 2  # the push before RL step 3 (one optimizer update per RL step)
# (trainer precision, rollout.vllm.dtype) pairs that run on a CPU (16-mixed and 16-true do not:
# the CLI refuses float16 training there)
PAIRS = [("32-true", "auto"), ("32-true", "bfloat16"), ("bf16-mixed", "auto"),
         ("bf16-mixed", "float32"), ("bf16-true", "auto")]


class Gaps(Callback):
    def __init__(self) -> None:
        self.gaps: list[float] = []
        self.largest: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.gaps.append(float(trainer.callback_metrics["rollout/sampler_logp_diff_mean"]))
        self.largest.append(float(trainer.callback_metrics["rollout/sampler_logp_diff_max"]))


@pytest.mark.parametrize("precision,dtype", PAIRS)
@pytest.mark.parametrize("lora", [False, True])
def test_measure(precision, dtype, lora, artifacts32, task_data, tmp_path, monkeypatch):
    extra = ["--model.init_args.rollout.engine=vllm",
             "--model.init_args.rollout.vllm.logp_tolerance=1e9",
             "--model.init_args.rollout.vllm.push_check=false",
             f"--model.init_args.rollout.vllm.dtype={dtype}",
             f"--trainer.precision={precision}",
             "--model.init_args.optim.lr=" + ("1e-4" if lora else "5e-5")]
    if lora:
        extra.append("--model.init_args.models.lora.r=8")
    cli, _ = make_cli("dvpo", tmp_path, artifacts32, task_data, *extra, rl_steps=4,
                      ppo_epochs=1, n_minibatches=1)
    skip_one_push(monkeypatch, SKIP_VERSION)
    gaps = Gaps()
    cli.trainer.callbacks.append(gaps)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    print("\nCALIBRATION", json.dumps({
        "precision": precision, "engine": dtype, "resolved": engine_dtype(dtype, precision),
        "lora": lora, "healthy": [gaps.gaps[i] for i in (0, 1, 3)],
        "healthy_max": max(gaps.largest[i] for i in (0, 1, 3)), "stale": gaps.gaps[2]}))


PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain photosynthesis in one sentence.", "Give me three tips for sleeping well.",
           "What is 12 times 7?", "Name a famous painter and one of their works.",
           "How do I boil an egg?", "Why is the sky blue?"]


@requires_smollm2
@pytest.mark.parametrize("precision,dtype", PAIRS)
@pytest.mark.parametrize("lora", [False, True])
def test_measure_smollm2(precision, dtype, lora):
    """SmolLM2-135M-Instruct, 8 chat prompts × 64 sampled tokens at T = 1: the gap of a
    healthy engine, and of the same engine after one Adam step it was not pushed (lr 5e-5
    full, 1e-4 LoRA; the loss: mean −log p of the samples). ``*-mixed``: the rollout and the
    scoring under the precision's autocast (as in Lightning's training step); ``*-true``: the
    model in the precision's dtype."""
    import contextlib

    import torch

    from dvpo_lightning.data.collate import pad_left
    from dvpo_lightning.models import load_causal_lm, load_tokenizer
    from dvpo_lightning.models.lora import LoraOptions, apply_lora
    from dvpo_lightning.models.named import resolve_model
    from dvpo_lightning.rollout.generation import SamplingConfig
    from dvpo_lightning.rollout.scoring import policy_logps
    from dvpo_lightning.rollout.vllm_engine import VLLMOptions

    path = resolve_model("smollm2-135m-instruct")
    tok = load_tokenizer(path)
    model = load_causal_lm(path, tok)
    true_dtype = {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(precision)
    if true_dtype is not None:
        model = model.to(true_dtype)
    if lora:
        model = apply_lora(model, LoraOptions(r=8))
    model.eval()
    rows = [tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                        add_generation_prompt=True),
                add_special_tokens=False)["input_ids"] for p in PROMPTS]
    ids, mask = pad_left(rows, tok.pad_token_id)
    engine = VLLMEngine(tok.eos_token_id, tok.pad_token_id,
                        VLLMOptions(dtype=dtype, push_check=False))
    engine.follow_precision(precision)

    def autocast():
        return (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed"
                else contextlib.nullcontext())

    def rollout(version):
        with autocast():
            return engine.generate(model, ids, mask, SamplingConfig(64), weights_version=version)

    largest = []

    def gap(samples, grad=False):
        with autocast(), torch.set_grad_enabled(grad):
            logps, _ = policy_logps(model, ids, mask, samples.response_ids,
                                    samples.response_mask)
        m = samples.response_mask
        diff = (samples.logps - logps.detach().float()).abs() * m
        largest.append(float(diff.max()))
        return logps, float(diff.sum() / m.sum())

    torch.manual_seed(0)
    first = rollout(0)
    logps, healthy = gap(first, grad=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4 if lora else 5e-5, weight_decay=0.0)
    loss = -(logps.float() * first.response_mask).sum() / first.response_mask.sum()
    loss.backward()
    opt.step()
    _, stale = gap(first)  # the engine was not pushed: its log-probs are of the old weights
    second = rollout(1)
    _, healthy2 = gap(second)
    print("\nCALIBRATION-SMOLLM2", json.dumps({
        "precision": precision, "engine": dtype, "resolved": engine.dtype, "lora": lora,
        "healthy": [healthy, healthy2], "healthy_max": max(largest[0], largest[2]),
        "stale": stale, "tokens": int(first.response_mask.sum())}))
