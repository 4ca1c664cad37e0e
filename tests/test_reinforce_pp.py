"""REINFORCE++ and REINFORCE++-baseline (``estimators/reinforce_pp.py``).

The math: a plain float64 loop on ragged random data with KL in the reward (both variants, γ 1
and 0.9), a case computed by hand, the discounted return-to-go, the group-baseline invariance,
the split across ranks, and agreement with OpenRLHF and verl, re-implemented here from their
code. The system: the RL module whitens these advantages over the global batch exactly once
(also with ``ppo.whiten_advantages``), and both train a policy through the real Trainer (a
stand-in experience source, and each config through the real CLI).
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from test_rl_step import FakeSource, TinyLM
from test_rl_step import fit as fit_parts
from test_rl_training import changed_frozen, finite_metrics, make_cli, unchanged_trainable
from test_rl_training import fit as fit_cli
from torch import nn
from torch.testing import assert_close

import dvpo_lightning.modules.dvpo as dvpo_module
from dvpo_lightning.estimators import GAE, GRPO, GVM, REINFORCEPP, RLOO, REINFORCEPPBaseline, ReMax
from dvpo_lightning.estimators.reinforce_pp import group_centred_scores, reinforce_pp_returns
from dvpo_lightning.modules.dvpo import DVPOModule
from dvpo_lightning.modules.optim import RLOptimSettings
from dvpo_lightning.modules.ppo import PPOSettings
from dvpo_lightning.ops.masked import masked_mean, masked_var
from dvpo_lightning.ops.normalize import advantage_stats, masked_moments, whiten_advantages
from dvpo_lightning.rollout import Experience
from dvpo_lightning.rollout.experience import Need
from dvpo_lightning.runtime.distributed import global_whiten

IDS = torch.tensor([3, 7, 3, 1, 7, 1, 3, 1, 7, 42, 42, 42])  # 4 prompts × 3, unordered


def make_exp(mask, kl, scores, group_ids=None) -> Experience:
    b, t = mask.shape
    return Experience(
        prompt_ids=torch.zeros(b, 2, dtype=torch.long),
        prompt_mask=torch.ones(b, 2, dtype=torch.bool),
        response_ids=torch.zeros(b, t, dtype=torch.long),
        response_mask=mask,
        logp_old=torch.zeros(b, t, dtype=kl.dtype),
        logp_ref=torch.zeros(b, t, dtype=kl.dtype),
        kl_penalty=kl,
        scores=scores,
        group_ids=group_ids,
    )


def ragged(seed: int, b: int = 12, t: int = 6):
    """float64 scores, β·KL with NaN at padded positions, a ragged right-padded mask."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[0] = t
    mask = torch.arange(t)[None, :] < lengths[:, None]
    kl = (torch.rand(b, t, generator=g, dtype=torch.float64) * 0.2 - 0.05).masked_fill(
        ~mask, math.nan)
    scores = torch.randn(b, generator=g, dtype=torch.float64) * 3 + 1
    return mask, kl, scores, lengths.tolist()


def advantages(est, exp: Experience) -> torch.Tensor:
    """What the RL module trains on: the estimator's output, whitened over the (one-process)
    global batch because the estimator says ``whitens``."""
    g, returns = est(exp)
    assert est.whitens and (returns == 0).all()
    return global_whiten(g, exp.response_mask)


def loop_reinforce_pp(scores, kl, lengths, gamma, ids=None):
    """Plain Python, float64: optional group-mean baseline, ``r_t = −kl_t + [t = L]·score``,
    ``G_t = r_t + γ·G_{t+1}``, whitening with the unbiased variance over all valid tokens."""
    b, t = kl.shape
    s = [float(x) for x in scores]
    if ids is not None:
        s = [s[i] - sum(s[j] for j in range(b) if ids[j] == ids[i])
             / sum(1 for j in range(b) if ids[j] == ids[i]) for i in range(b)]
    g = [[0.0] * t for _ in range(b)]
    for i in range(b):
        running = 0.0
        for k in reversed(range(lengths[i])):
            running = -float(kl[i, k]) + (s[i] if k == lengths[i] - 1 else 0.0) + gamma * running
            g[i][k] = running
    valid = [g[i][k] for i in range(b) for k in range(lengths[i])]
    mean = sum(valid) / len(valid)
    var = sum((x - mean) ** 2 for x in valid) / (len(valid) - 1)
    adv = [[(g[i][k] - mean) / math.sqrt(var + 1e-8) if k < lengths[i] else 0.0
            for k in range(t)] for i in range(b)]
    return torch.tensor(g, dtype=torch.float64), torch.tensor(adv, dtype=torch.float64)


# --- the math -------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("baseline", [False, True], ids=["reinforce_pp", "baseline"])
def test_matches_a_plain_loop_on_ragged_data_with_kl(baseline, gamma):
    for seed in range(3):
        mask, kl, scores, lengths = ragged(seed)
        est = REINFORCEPPBaseline(group_size=3, gamma=gamma) if baseline else REINFORCEPP(gamma)
        exp = make_exp(mask, kl, scores, IDS if baseline else None)
        want_g, want_adv = loop_reinforce_pp(scores, kl, lengths, gamma, IDS if baseline else None)
        g, _ = est(exp)
        assert_close(g, want_g)
        adv = advantages(est, exp)
        assert_close(adv, want_adv)
        assert torch.isfinite(adv).all() and (adv[~mask] == 0).all()  # NaN padding never leaks


def test_known_answer_by_hand():
    mask = torch.tensor([[True, True, True], [True, True, False]])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]], dtype=torch.float64)
    exp = make_exp(mask, kl, torch.tensor([1.0, 2.0], dtype=torch.float64))
    # r = [−0.1, −0.2, 1 − 0.3] and [−0.4, 2 − 0.5]; G is their return-to-go (γ = 1)
    g, _ = REINFORCEPP()(exp)
    assert_close(g, torch.tensor([[0.4, 0.5, 0.7], [1.1, 1.5, 0.0]], dtype=torch.float64))
    # five valid G: mean 4.2 / 5 = 0.84, squared deviations sum 0.832, unbiased variance 0.208
    want = (torch.tensor([[0.4, 0.5, 0.7], [1.1, 1.5, 0.84]], dtype=torch.float64) - 0.84) \
        / math.sqrt(0.208 + 1e-8)
    assert_close(advantages(REINFORCEPP(), exp), want * mask)

    # baseline: one prompt, scores 3 and 1 → centred +1 and −1, no KL → G = ±1 on every token
    exp = make_exp(mask, torch.zeros(2, 3, dtype=torch.float64),
                   torch.tensor([3.0, 1.0], dtype=torch.float64), torch.tensor([5, 5]))
    g, _ = REINFORCEPPBaseline(group_size=2)(exp)
    assert_close(g, torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, 0.0]], dtype=torch.float64))


def test_returns_to_go_with_gamma():
    mask = torch.tensor([[True, True, True, False]])
    no_kl = torch.tensor([[0.0, 0.0, 0.0, math.nan]])
    # γ = 0.5, the score 1 on the last valid token: G = [0.25, 0.5, 1]
    assert_close(reinforce_pp_returns(torch.tensor([1.0]), no_kl, mask, gamma=0.5),
                 torch.tensor([[0.25, 0.5, 1.0, 0.0]]))
    # a KL of 0.1 on the first token is that token's reward only: G_1 = −0.1 + 0.5·0.5
    kl = torch.tensor([[0.1, 0.0, 0.0, math.nan]])
    assert_close(reinforce_pp_returns(torch.tensor([1.0]), kl, mask, gamma=0.5),
                 torch.tensor([[0.15, 0.5, 1.0, 0.0]]))
    # γ = 1: G_t = score − Σ_{s≥t} KL_s (the paper's token-level advantage)
    kl = torch.tensor([[0.1, 0.2, 0.3, math.nan]])
    assert_close(reinforce_pp_returns(torch.tensor([1.0]), kl, mask),
                 torch.tensor([[0.4, 0.5, 0.7, 0.0]]))


def test_baseline_ignores_a_constant_added_to_every_score_of_a_group():
    mask, kl, scores, _ = ragged(7)
    est = REINFORCEPPBaseline(group_size=3)
    shift = {3: 10.0, 7: -4.0, 1: 0.5, 42: 1e3}
    shifted = scores + torch.tensor([shift[int(i)] for i in IDS], dtype=torch.float64)
    a, b = make_exp(mask, kl, scores, IDS), make_exp(mask, kl, shifted, IDS)
    assert_close(est(a)[0], est(b)[0])
    assert_close(advantages(est, a), advantages(est, b))
    centred = group_centred_scores(scores, IDS)
    for gid in IDS.unique():
        assert abs(float(centred[IDS == gid].sum())) < 1e-12
    # (REINFORCE++ itself has no baseline: the same shift changes its advantages)
    assert not torch.allclose(advantages(REINFORCEPP(), a), advantages(REINFORCEPP(), b))


@pytest.mark.parametrize("est", [REINFORCEPP(), REINFORCEPPBaseline(group_size=3)],
                         ids=lambda e: type(e).__name__)
def test_the_same_advantages_when_the_batch_is_split_across_ranks(est):
    """Each rank holds whole groups; the module whitens with moments summed over ranks, so the
    advantages do not depend on the number of processes."""
    mask, kl, scores, _ = ragged(11)
    whole = make_exp(mask, kl, scores, IDS)
    ranks = [torch.isin(IDS, torch.tensor(part)) for part in ([3, 7], [1, 42])]
    parts = [(est(whole.index(r))[0], mask[r]) for r in ranks]
    moments = [torch.stack(masked_moments(g, m)) for g, m in parts]
    stats = advantage_stats(tuple(moments[0] + moments[1]))
    split = torch.zeros_like(kl)
    for r, (g, m) in zip(ranks, parts):
        split[r] = whiten_advantages(g, m, stats=stats)
    assert_close(split, advantages(est, whole))


# --- the references: OpenRLHF and verl, re-implemented from reading their code ---------------


def openrlhf_reference(scores, kl, mask, kl_coef, gamma, n_samples=None):
    """OpenRLHF ``openrlhf/trainer/ppo_utils/experience_maker.py`` (commit 3c3be62):
    ``compute_advantages_and_returns`` (group mean subtracted from the reshaped
    ``(-1, n_samples_per_prompt)`` raw rewards for ``reinforce_baseline``, whose γ is forced to
    1), ``openrlhf/models/utils.py::compute_reward`` (``−kl_coef·kl``, the reward scattered on
    the last action-mask position), ``get_cumulative_returns`` (rewards × mask, ``G_t = r_t +
    γ·G_{t+1}``), then the normalisation over all experiences: ``mean = Σ A·m / n``,
    ``var = Σ (A − mean)²·m / n`` (biased), ``A = (A − mean)·rsqrt(clamp(var, 1e-8))``."""
    r = scores.clone()
    if n_samples is not None:  # reinforce_baseline: rows are prompt-major, n per prompt
        r = r.reshape(-1, n_samples)
        r = (r - r.mean(-1, keepdim=True)).reshape(-1)
        gamma = 1.0
    m = mask.to(kl.dtype)
    eos = mask.size(1) - 1 - mask.long().fliplr().argmax(dim=1, keepdim=True)
    reward = torch.zeros_like(kl).scatter_(1, eos, r.unsqueeze(1)) - kl_coef * kl
    reward = reward * m
    returns = torch.zeros_like(reward)
    running = torch.zeros(reward.size(0), dtype=reward.dtype)
    for t in reversed(range(reward.size(1))):
        running = reward[:, t] + gamma * running
        returns[:, t] = running
    n = m.sum()
    mean = (returns * m).sum() / n
    var = ((returns - mean).pow(2) * m).sum() / n
    return (returns - mean) * var.clamp(min=1e-8).rsqrt(), n


def verl_reference(scores, kl, mask, beta, gamma, index=None):
    """verl ``verl/trainer/ppo/core_algos.py`` (commit b178a3c). Token rewards as
    ``ray_trainer.py::apply_kl_penalty``: ``token_level_scores − β·kld`` (the score on the last
    response token, ``kld`` masked). ``compute_reinforce_plus_plus_outcome_advantage``: the
    running return ``G_t = r_t + γ·G_{t+1}`` reset by the mask, then
    ``verl_F.masked_whiten`` (unbiased variance, ``rsqrt(var + 1e-8)``).
    ``compute_reinforce_plus_plus_baseline_outcome_advantage`` (``index`` given): the sequence
    sum of the token rewards minus its prompt's mean (0 for a lone response), tiled over the
    response, masked, then ``masked_whiten``."""
    m = mask.to(kl.dtype)
    last = mask.sum(1) - 1
    token_scores = torch.zeros_like(kl)
    token_scores[torch.arange(len(scores)), last] = scores
    rewards = token_scores - beta * (kl * m)
    if index is None:
        returns = torch.zeros_like(rewards)
        running = torch.zeros(rewards.size(0), dtype=rewards.dtype)
        for t in reversed(range(rewards.size(1))):
            running = rewards[:, t] + gamma * running
            returns[:, t] = running
            running = running * m[:, t]
        x = returns
    else:
        seq = rewards.sum(-1)
        groups: dict[int, list] = {}
        for i, idx in enumerate(index.tolist()):
            groups.setdefault(idx, []).append(seq[i])
        mean = {k: torch.stack(v).mean() if len(v) > 1 else 0.0 for k, v in groups.items()}
        seq = torch.stack([seq[i] - mean[idx] for i, idx in enumerate(index.tolist())])
        x = seq[:, None].expand_as(rewards) * m
    n = m.sum()
    mu = (x * m).sum() / n
    var = ((x - mu) ** 2 * m).sum() / n * (n / (n - 1))
    return (x - mu) * torch.rsqrt(var + 1e-8) * m


def kl_free(mask, kl):
    return torch.where(mask, kl, 0.0)  # the libraries read padded positions (as 0 after × mask)


@pytest.mark.parametrize("baseline,gamma", [(False, 1.0), (False, 0.9), (True, 1.0)],
                         ids=["reinforce", "reinforce-gamma0.9", "reinforce_baseline"])
def test_agrees_with_openrlhf(baseline, gamma):
    """Identical up to OpenRLHF's biased variance: ours = theirs·√((n − 1)/n)."""
    mask, kl, scores, _ = ragged(21)
    beta = 0.05
    ids = torch.arange(12) // 3  # OpenRLHF's layout: prompt-major, 3 samples per prompt
    est = REINFORCEPPBaseline(group_size=3) if baseline else REINFORCEPP(gamma)
    ours = advantages(est, make_exp(mask, beta * kl, scores, ids))
    theirs, n = openrlhf_reference(scores, kl_free(mask, kl), mask, beta, gamma,
                                   3 if baseline else None)
    assert_close(ours, theirs * torch.sqrt((n - 1) / n) * mask, rtol=1e-6, atol=1e-7)


def test_agrees_with_verl():
    """REINFORCE++: identical, with the KL in the reward and any γ. REINFORCE++-baseline:
    identical when the KL is not in the reward; with it, verl centres ``score − Σ β·KL`` and
    puts it on every token, where this (and OpenRLHF) centres the score and keeps the KL's
    return-to-go."""
    mask, kl, scores, _ = ragged(31)
    beta = 0.05
    for gamma in (1.0, 0.8):
        ours = advantages(REINFORCEPP(gamma), make_exp(mask, beta * kl, scores))
        assert_close(ours, verl_reference(scores, kl_free(mask, kl), mask, beta, gamma))

    est = REINFORCEPPBaseline(group_size=3)
    no_kl = torch.zeros_like(kl)
    ours = advantages(est, make_exp(mask, no_kl, scores, IDS))
    assert_close(ours, verl_reference(scores, no_kl, mask, beta, 1.0, IDS))
    ours = advantages(est, make_exp(mask, beta * kl, scores, IDS))
    theirs = verl_reference(scores, kl_free(mask, kl), mask, beta, 1.0, IDS)
    assert not torch.allclose(ours, theirs)


# --- contract and errors ----------------------------------------------------------------------


def test_needs_whitening_flag_and_errors():
    assert REINFORCEPP().needs == {Need.SCORES} and REINFORCEPP().group_size == 1
    est = REINFORCEPPBaseline(group_size=3)
    assert est.needs == {Need.SCORES, Need.GROUPS} and est.group_size == 3
    assert REINFORCEPP.whitens and REINFORCEPPBaseline.whitens
    assert not any(cls.whitens for cls in (GAE, GRPO, GVM, RLOO, ReMax))
    assert not (REINFORCEPP.trains_critic or REINFORCEPPBaseline.trains_critic)
    with pytest.raises(ValueError, match="group_size must be >= 2.*use REINFORCEPP"):
        REINFORCEPPBaseline(group_size=1)
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\], got 1.5"):
        REINFORCEPP(gamma=1.5)
    mask, kl, scores, _ = ragged(0)
    with pytest.raises(ValueError, match="expected every prompt to have group_size=4"):
        REINFORCEPPBaseline(group_size=4)(make_exp(mask, kl, scores, IDS))
    with pytest.raises(ValueError, match="needs 'groups'"):
        est(make_exp(mask, kl, scores))
    with pytest.raises(ValueError, match="needs 'scores'"):
        REINFORCEPP()(make_exp(mask, kl, None))
    with pytest.raises(ValueError, match="a group has a single response"):
        group_centred_scores(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 1]))


# --- the RL module ----------------------------------------------------------------------------

SCORES = torch.tensor([1.0, -0.5, 2.0, 0.3])
GROUPS = torch.tensor([0, 0, 1, 1])  # B = 4 responses: 2 prompts × 2


class ScoredSource(FakeSource):
    """The stand-in source of ``test_rl_step`` with reward-model scores and group ids instead of
    GVM values (``scored=False``: its GVM values)."""

    def __init__(self, policy: nn.Module, scored: bool = True) -> None:
        super().__init__(policy)
        self.scored = scored

    @torch.no_grad()
    def forward(self, policy, batch, critic=None, weights_version=None, behaviour=None):
        exp, info = super().forward(policy, batch, critic, behaviour=behaviour)
        if self.scored:
            exp = replace(exp, values=None, scores=SCORES, group_ids=GROUPS)
        return exp, info


def module_with(estimator, **settings) -> DVPOModule:
    torch.manual_seed(0)
    policy = TinyLM()
    return DVPOModule.from_parts(nn.ModuleDict({"policy": policy}), ScoredSource(policy),
                                 estimator, **settings)


@pytest.mark.parametrize("whiten_flag", [False, True])
def test_the_module_whitens_once_over_the_global_batch(whiten_flag, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(dvpo_module, "global_whiten",
                        lambda adv, mask: calls.append(1) or global_whiten(adv, mask))
    module = module_with(REINFORCEPPBaseline(group_size=2),
                         ppo=PPOSettings(epochs=1, whiten_advantages=whiten_flag))
    seen = []
    update = module.ppo_update
    module.ppo_update = lambda exp, adv, ret: seen.append((exp, adv)) or update(exp, adv, ret)
    fit_parts(module, 2, tmp_path)
    assert len(calls) == 2  # once per RL step, with or without ppo.whiten_advantages
    for exp, adv in seen:
        mask = exp.response_mask
        assert abs(float(masked_mean(adv, mask))) < 1e-6
        assert abs(float(masked_var(adv, mask)) - 1) < 1e-4
        assert_close(adv, whiten_advantages(module.estimator(exp)[0], mask))

    calls.clear()  # an estimator that does not whiten is left alone
    policy = TinyLM()
    module = DVPOModule.from_parts(nn.ModuleDict({"policy": policy}),
                                   ScoredSource(policy, scored=False), GVM(),
                                   ppo=PPOSettings(epochs=1))
    fit_parts(module, 1, tmp_path)
    assert calls == []


@pytest.mark.parametrize("estimator", [REINFORCEPP(), REINFORCEPPBaseline(group_size=2)],
                         ids=lambda e: type(e).__name__)
def test_trains_every_policy_weight_and_never_the_reference(estimator, tmp_path):
    module = module_with(estimator, ppo=PPOSettings(epochs=2, mini_batch_size=2),
                         optim=RLOptimSettings(lr=1e-2))
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = fit_parts(module, 2, tmp_path)
    assert trainer.global_step == 2
    for n, p in module.named_parameters():
        assert (not torch.equal(before[n], p.detach())) == n.startswith("trained."), n
    assert math.isfinite(float(trainer.callback_metrics["train/policy_loss"]))


@pytest.mark.parametrize("name,estimator", [("reinforce_pp", "REINFORCEPP"),
                                            ("reinforce_pp_baseline", "REINFORCEPPBaseline")])
def test_config_trains_two_rl_steps(name, estimator, artifacts, task_data, tmp_path):
    cli, _ = make_cli(name, tmp_path, artifacts, task_data)
    assert type(cli.model.estimator).__name__ == estimator
    before = fit_cli(cli)
    assert cli.trainer.global_step == 2
    metrics = finite_metrics(cli.trainer)
    assert metrics["train/skipped_minibatches"] == 0 and abs(metrics["adv/mean"]) < 1e-5
    assert unchanged_trainable(cli.model, before) == []
    assert changed_frozen(cli.model, before) == []
