"""The trainer scores the distribution the engine samples from (temperature, top-k, top-p), and
the engine reports that same distribution: the real vLLM CPU engine and ``generate``, tiny models.

Checked: at T = 0.5, top-p 0.9, top-k 20 vLLM's reported log-probs equal the trainer's
``logp_old`` to float32 noise, while the raw log-softmax (what the trainer scored before) is off by
a large fraction of a nat per token; with ``generate`` at T = 0.5 ``logp_old`` is
``log_softmax(logits / T)`` at the sampled tokens and ``logp_ref`` the reference's at T alone;
the PPO update's first ratio is 1 under the same transform; the held-out KL uses the eval
sampling's; at T = 1 nothing changes.
"""

from __future__ import annotations

import pytest
import torch
from test_rl_step import EOS, FakeSource, fit, module_and_source
from transformers import AutoModelForCausalLM

from dvpo_lightning.data.collate import pad_left
from dvpo_lightning.models import load_tokenizer
from dvpo_lightning.models.tiny import tiny_config
from dvpo_lightning.modules.ppo import PPOSettings
from dvpo_lightning.rollout.evaluation import HeldOutEvaluator
from dvpo_lightning.rollout.experience_maker import ExperienceMaker
from dvpo_lightning.rollout.generation import HFGenerator, SamplingConfig
from dvpo_lightning.rollout.scoring import policy_logps
from dvpo_lightning.rollout.settings import RolloutSettings

pytestmark = pytest.mark.filterwarnings("ignore")
SAMPLED = dict(temperature=0.5, top_p=0.9, top_k=20)
VOCAB = 96  # the task's tokenizer has 15 tokens: a larger head, so that top-k 20 truncates


def model32(tok, seed: int = 0) -> torch.nn.Module:
    """``test-llama-32`` (heads vLLM's CPU attention serves) with a ``VOCAB``-token head."""
    torch.manual_seed(seed)
    cfg = tiny_config("test-llama-32", VOCAB, tok.pad_token_id, tok.bos_token_id,
                      tok.eos_token_id)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def prompts(tok):
    texts = ["3172=", "90=", "5555123=", "41=", "807=", "2=", "66=", "12345="]
    return pad_left([tok(t, add_special_tokens=False)["input_ids"] for t in texts],
                    tok.pad_token_id)


def maker(tok, generator, **sampling) -> ExperienceMaker:
    reference = model32(tok, seed=1).requires_grad_(False)
    return ExperienceMaker(frozenset(), 1, torch.nn.ModuleDict({"reference": reference}),
                           generator, RolloutSettings(max_new_tokens=12, **sampling), tok)


def logits_of(model, prompt_ids, prompt_mask, response_ids, response_mask) -> torch.Tensor:
    """``(B, T, V)`` float32 logits predicting each response token, by a plain forward."""
    ids = torch.cat([prompt_ids, response_ids], 1)
    mask = torch.cat([prompt_mask, response_mask], 1).long()
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
    return out[:, prompt_ids.shape[1] - 1:-1]


def mean_gap(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float(((a - b).abs() * mask).sum() / mask.sum())


def test_vllm_reports_the_distribution_it_samples_from_and_the_trainer_scores_it(tok, prompts):
    from dvpo_lightning.rollout.vllm_engine import VLLMEngine

    x = maker(tok, VLLMEngine(tok.eos_token_id, tok.pad_token_id), **SAMPLED)
    policy = model32(tok)
    torch.manual_seed(0)
    exp, _ = x(policy, {"prompt_ids": prompts[0], "prompt_mask": prompts[1],
                        "prompts": [""] * prompts[0].shape[0]}, weights_version=0)
    mask = exp.response_mask
    assert mask.sum() > 40
    assert mean_gap(exp.logp_sampler, exp.logp_old, mask) < 1e-4
    raw = policy_logps(policy, exp.prompt_ids, exp.prompt_mask, exp.response_ids, mask)[0]
    assert mean_gap(exp.logp_sampler, raw, mask) > 0.1  # the defect: the raw softmax's
    # the reference's for the KL: its temperature alone, never truncated
    z = logits_of(x.frozen["reference"], exp.prompt_ids, exp.prompt_mask, exp.response_ids,
                  mask)
    want = (z / 0.5).log_softmax(-1).gather(2, exp.response_ids[..., None])[..., 0] * mask
    torch.testing.assert_close(exp.logp_ref, want, atol=1e-5, rtol=0)


def test_generate_at_half_temperature_scores_log_softmax_of_logits_over_t(tok, prompts):
    x = maker(tok, HFGenerator(tok.eos_token_id, tok.pad_token_id), temperature=0.5)
    policy = model32(tok)
    torch.manual_seed(0)
    exp, _ = x(policy, {"prompt_ids": prompts[0], "prompt_mask": prompts[1],
                        "prompts": [""] * prompts[0].shape[0]})
    seq = (exp.prompt_ids, exp.prompt_mask, exp.response_ids, exp.response_mask)
    z = logits_of(policy, *seq)
    pick = exp.response_ids[..., None]
    want = (z / 0.5).log_softmax(-1).gather(2, pick)[..., 0] * exp.response_mask
    torch.testing.assert_close(exp.logp_old, want, atol=1e-5, rtol=0)
    raw = z.log_softmax(-1).gather(2, pick)[..., 0] * exp.response_mask
    assert mean_gap(exp.logp_old, raw, exp.response_mask) > 0.1


def test_the_first_ppo_ratio_is_one_under_the_samplers_transform(tmp_path):
    """The update's new log-probs are of the distribution ``logp_old`` is: at the first
    mini-batch of the first epoch they are equal (ratio 1, approx. KL 0)."""
    # (rescore: an on-policy update would take logp_old from its own forward, ratio 1 by
    # construction; here the two passes must agree because they share the transform)
    module, source = module_and_source(ppo=PPOSettings(epochs=1, behaviour_logps="rescore"))
    source.settings = RolloutSettings(max_new_tokens=5, temperature=0.5, top_p=0.8, top_k=4)
    sampling = source.settings.sampling.policy_transform((EOS,))
    seq = source.seq

    def forward(policy, batch, critic=None, weights_version=None, behaviour=None):
        exp, info = FakeSource.forward(source, policy, batch, critic, weights_version, behaviour)
        exp.logp_old = policy_logps(policy, *seq, sampling=sampling)[0].detach()
        return exp, info

    source.forward = forward
    trainer = fit(module, 1, tmp_path)
    assert trainer.callback_metrics["train/approx_kl"].abs() < 1e-7


def test_held_out_kl_is_scored_under_the_eval_sampling(tok, prompts):
    """The reference answering itself: KL 0 at T alone (both sides tempered the same); with
    top-p the policy side is truncated and the reference's not: ``Σ −log(kept mass) > 0``."""
    policy = model32(tok)
    for cfg, zero in ((SamplingConfig(10, temperature=0.5), True),
                      (SamplingConfig(10, temperature=0.5, top_p=0.9), False)):
        ev = HeldOutEvaluator(HFGenerator(tok.eos_token_id, tok.pad_token_id), cfg, tok,
                              reference_logps=lambda m, *s, sampling=None: 1 / 0)
        torch.manual_seed(0)
        kl = ev.evaluate(policy, *prompts, [""] * prompts[0].shape[0], is_reference=True)
        if zero:
            assert torch.equal(kl["kl_to_ref"], torch.zeros_like(kl["kl_to_ref"]))
        else:
            assert (kl["kl_to_ref"] > 0).all()


def test_at_t1_the_trainer_and_its_transforms_are_the_model_itself(tok):
    """T = 1, top-p 1, top-k 0 (the study), and greedy decoding at any setting: no transform,
    so the log-probs are computed by the untransformed code, to the bit."""
    assert RolloutSettings().sampling.policy_transform((EOS,)) is None
    assert RolloutSettings().sampling.reference_transform() is None
    assert RolloutSettings(temperature=0, top_p=0.5).sampling.policy_transform((EOS,)) is None
    assert RolloutSettings(**SAMPLED).greedy_sampling.policy_transform((EOS,)) is None
    assert RolloutSettings(**SAMPLED, eval_greedy=True).eval_sampling.reference_transform() \
        is None


@pytest.mark.parametrize("config", ["dvpo", "grpo"])
def test_rl_with_vllm_trains_on_the_sampled_distribution(config, artifacts32, task_data,
                                                          tmp_path):
    """Through the real CLI at T = 0.5, top-p 0.9, top-k 5 with TIS: every metric finite (the
    KL in the reward or in the loss, against a tempered reference), the probe at float noise,
    and the entropy logged is the truncated distribution's (at most log 5)."""
    import math

    from test_rl_training import finite_metrics, make_cli
    from test_rl_training import fit as fit_cli

    cli, _ = make_cli(config, tmp_path, artifacts32, task_data,
                      "--model.init_args.rollout.engine=vllm",
                      "--model.init_args.rollout.temperature=0.5",
                      "--model.init_args.rollout.top_p=0.9", "--model.init_args.rollout.top_k=5",
                      "--model.init_args.ppo.tis_cap=2.0")
    fit_cli(cli)
    metrics = finite_metrics(cli.trainer)
    assert metrics["rollout/sampler_logp_diff_mean"] < 1e-4
    assert metrics["train/entropy"] <= math.log(5) + 1e-5
    assert "eval/kl_to_ref" in metrics
