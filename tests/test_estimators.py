import math

import pytest
import torch
from torch.testing import assert_close

from dvpo_lightning.estimators import GAE, GRPO, GVM, RLOO, Need, ReMax
from dvpo_lightning.estimators.grpo import group_normalized_advantages
from dvpo_lightning.estimators.gvm import gvm_advantages
from dvpo_lightning.estimators.rloo import rloo_advantages
from dvpo_lightning.ops.normalize import advantage_stats, masked_moments, whiten_advantages
from dvpo_lightning.rollout import Experience


def make_exp(mask, kl=None, values=None, scores=None, group_ids=None, baseline=None):
    b, t = mask.shape
    return Experience(
        prompt_ids=torch.zeros(b, 2, dtype=torch.long),
        prompt_mask=torch.ones(b, 2, dtype=torch.bool),
        response_ids=torch.zeros(b, t, dtype=torch.long),
        response_mask=mask,
        logp_old=torch.zeros(b, t),
        logp_ref=torch.zeros(b, t),
        kl_penalty=torch.zeros(b, t) if kl is None else kl,
        values=values,
        scores=scores,
        group_ids=group_ids,
        baseline_scores=baseline,
    )


def ragged(seed, b=6, t=5):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[0] = t
    mask = torch.arange(t)[None, :] < lengths[:, None]
    return g, mask, lengths.tolist()


def test_gae_estimator_known_answer():
    mask = torch.tensor([[True, True, False]])
    exp = make_exp(mask, kl=torch.tensor([[0.1, 0.2, 5.0]]),
                   values=torch.tensor([[0.5, 0.25, 99.0, 99.0]]), scores=torch.tensor([1.0]))
    est = GAE(gamma=1.0, lam=1.0)
    assert est.trains_critic and est.needs == {Need.CRITIC_VALUES, Need.SCORES}
    adv, ret = est(exp)
    # r = [−0.1, 0.8]; A_2 = 0.8 − 0.25; A_1 = −0.1 + 0.25 − 0.5 + A_2
    assert_close(adv, torch.tensor([[0.2, 0.55, 0.0]]))
    assert_close(ret, torch.tensor([[0.7, 0.8, 0.0]]))


def loop_group_norm(scores, ids, eps, scale):
    out = torch.zeros_like(scores)
    for i in range(len(scores)):
        members = [scores[j].item() for j in range(len(scores)) if ids[j] == ids[i]]
        mean = sum(members) / len(members)
        std = math.sqrt(sum((x - mean) ** 2 for x in members) / (len(members) - 1))
        out[i] = (scores[i].item() - mean) / ((std + eps) if scale == "std" else 1.0)
    return out


def loop_rloo(rewards, ids):
    out = torch.zeros_like(rewards)
    for i in range(len(rewards)):
        others = [rewards[j].item() for j in range(len(rewards)) if ids[j] == ids[i] and j != i]
        out[i] = rewards[i].item() - sum(others) / len(others)
    return out


SHUFFLED_IDS = torch.tensor([3, 7, 3, 1, 7, 1, 3, 1, 7, 3, 42, 42])  # unequal, unordered groups


@pytest.mark.parametrize("scale", ["std", "none"])
def test_group_norm_matches_loop_and_has_zero_group_mean(scale):
    scores = torch.randn(12, generator=torch.Generator().manual_seed(0)) * 4 + 2
    adv = group_normalized_advantages(scores, SHUFFLED_IDS, 1e-6, scale)
    assert_close(adv, loop_group_norm(scores, SHUFFLED_IDS, 1e-6, scale))
    for gid in SHUFFLED_IDS.unique():
        assert abs(adv[SHUFFLED_IDS == gid].mean().item()) < 1e-5


def test_group_std_is_two_pass_for_large_nearly_tied_scores():
    """Scores of 1e4 ± 1e-2: Σx² − n·mean² cancels most digits of the spread (advantages off by
    2.5e-4 here); deviations from the mean keep them. Reference: ``torch.std`` per group."""
    g = torch.Generator().manual_seed(2)
    ids = torch.arange(8).repeat_interleave(4)
    scores = 1e4 + 1e-2 * torch.randn(32, generator=g, dtype=torch.float64)
    adv = group_normalized_advantages(scores, ids, 0.0).view(8, 4)
    x = scores.view(8, 4)
    want = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)
    assert_close(adv, want, atol=1e-8, rtol=1e-8)


def test_rloo_matches_loop_and_sums_to_zero():
    rewards = torch.randn(12, generator=torch.Generator().manual_seed(1))
    adv = rloo_advantages(rewards, SHUFFLED_IDS)
    assert_close(adv, loop_rloo(rewards, SHUFFLED_IDS))
    for gid in SHUFFLED_IDS.unique():
        assert abs(adv[SHUFFLED_IDS == gid].sum().item()) < 1e-5


def test_singleton_groups_rejected():
    with pytest.raises(ValueError, match="single response"):
        group_normalized_advantages(torch.randn(3), torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="single response"):
        rloo_advantages(torch.randn(3), torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="group_size"):
        RLOO(group_size=1)


@pytest.mark.parametrize("cls", [GRPO, RLOO])
def test_group_estimators_use_kl_and_broadcast(cls):
    mask = torch.tensor([[True, True], [True, False]])
    kl = torch.tensor([[0.5, 0.5], [0.0, 1e9]])  # R = [1 − 1, 1 − 0] = [0, 1]
    exp = make_exp(mask, kl=kl, scores=torch.tensor([1.0, 1.0]), group_ids=torch.tensor([0, 0]))
    adv, ret = cls(group_size=2)(exp)
    a = -0.5 / (math.sqrt(0.5) + 1e-6) if cls is GRPO else -1.0  # GRPO: mean ½, std √½
    assert_close(adv, torch.tensor([[a, a], [-a, 0.0]]))
    assert (ret == 0).all()
    with pytest.raises(ValueError, match="group_size=3"):
        cls(group_size=3)(exp)


def test_remax():
    mask = torch.tensor([[True, True, False], [True, True, True]])
    scores = torch.tensor([2.0, -1.0])
    exp = make_exp(mask, scores=scores, baseline=scores.clone())
    adv, ret = ReMax()(exp)
    assert (adv == 0).all() and (ret == 0).all()
    kl = torch.tensor([[0.25, 0.25, 1e9], [0.0, 0.0, 0.0]])
    adv, _ = ReMax()(make_exp(mask, kl=kl, scores=scores, baseline=torch.tensor([1.0, 0.0])))
    assert_close(adv, torch.tensor([[0.5, 0.5, 0.0], [-1.0, -1.0, -1.0]]))


U = torch.tensor([[0.0, 0.5, 0.75, 1.0], [0.25, 1.0, -2.0, 9.0]])
UMASK = torch.tensor([[True, True, True], [True, False, False]])


def test_gvm_paper_and_value_difference_known_answers():
    zero = torch.zeros(2, 3)
    assert_close(gvm_advantages(U, zero, UMASK, "paper"),
                 torch.tensor([[0.5, 0.75, 1.0], [1.0, 0.0, 0.0]]))  # exactly u_t without KL
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 7.0, 7.0]])
    assert_close(gvm_advantages(U, kl, UMASK, "paper"),
                 torch.tensor([[0.5 - 0.6, 0.75 - 0.5, 1.0 - 0.3], [0.5, 0.0, 0.0]]))
    vd = gvm_advantages(U, kl, UMASK, "value_difference")
    assert_close(vd, torch.tensor([[0.4, 0.05, -0.05], [0.25, 0.0, 0.0]]))


def test_gvm_value_difference_telescopes():
    g, mask, lengths = ragged(5)
    u, kl = torch.randn(6, 6, generator=g), torch.rand(6, 5, generator=g)
    adv = gvm_advantages(u, kl, mask, "value_difference")
    last = torch.tensor(lengths)
    expected = u[torch.arange(6), last] - u[:, 0] - (kl * mask).sum(1)
    assert_close(adv.sum(1), expected)


def loop_code_version(u, kl, lengths, gamma, lam):
    adv = torch.zeros_like(kl)
    for i, n in enumerate(lengths):
        v = u[i, :n]
        v = (v - v.mean()) / torch.sqrt((v.var() if n > 1 else torch.tensor(0.0)) + 1e-8)
        a_next = 0.0
        for k in reversed(range(n)):
            v_next = v[k + 1].item() if k + 1 < n else 0.0
            a_next = -kl[i, k].item() + gamma * v_next - v[k].item() + gamma * lam * a_next
            adv[i, k] = a_next
    valid = torch.cat([adv[i, :n] for i, n in enumerate(lengths)])
    mask = torch.arange(kl.shape[1])[None, :] < torch.tensor(lengths)[:, None]
    return torch.where(mask, (adv - valid.mean()) / torch.sqrt(valid.var() + 1e-8), 0.0)


def test_gvm_code_version_matches_loop_and_is_whitened():
    g, mask, lengths = ragged(6)
    u, kl = torch.randn(6, 6, generator=g) * 3 + 1, 0.1 * torch.rand(6, 5, generator=g)
    adv = gvm_advantages(u, kl, mask, "code", gamma=1.0, lam=0.95)
    assert_close(adv, loop_code_version(u, kl, lengths, 1.0, 0.95), atol=1e-5, rtol=1e-5)
    assert abs(adv[mask].mean().item()) < 1e-5 and abs(adv[mask].std().item() - 1) < 1e-4
    # per-sequence whitening: a per-row affine change of the values changes nothing
    scaled = u * torch.rand(6, 1, generator=g).add(0.5) + torch.randn(6, 1, generator=g)
    assert_close(gvm_advantages(scaled, kl, mask, "code"), adv, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("version", ["paper", "value_difference", "code"])
def test_gvm_ignores_masked_garbage_and_zeroes_padding(version):
    g, mask, lengths = ragged(7)
    u, kl = torch.randn(6, 6, generator=g), 0.1 * torch.rand(6, 5, generator=g)
    used = torch.arange(6)[None, :] <= torch.tensor(lengths)[:, None]  # u_0 … u_L
    u2, kl2 = torch.where(used, u, 1e9), torch.where(mask, kl, -1e9)
    exp, exp2 = make_exp(mask, kl=kl, values=u), make_exp(mask, kl=kl2, values=u2)
    est = GVM(version=version)
    (a, r), (b, _) = est(exp), est(exp2)
    assert_close(a, b)
    assert (a[~mask] == 0).all() and (r == 0).all()


def test_gvm_needs_and_errors():
    est = GVM()
    assert est.needs == {Need.GVM_VALUES} and not est.trains_critic
    with pytest.raises(ValueError, match="gvm_values"):
        est(make_exp(UMASK))
    with pytest.raises(ValueError, match="value_difference"):
        GVM(version="q")


def test_whiten_advantages_global_stats():
    g, mask, _ = ragged(8)
    adv = torch.randn(6, 5, generator=g)
    halves = [masked_moments(adv[:3], mask[:3]), masked_moments(adv[3:], mask[3:])]
    stats = advantage_stats(tuple(a + b for a, b in zip(*halves)))
    split = torch.cat([whiten_advantages(adv[:3], mask[:3], stats),
                       whiten_advantages(adv[3:], mask[3:], stats)])
    assert_close(split, whiten_advantages(adv, mask))


def test_the_base_class_checks_needs_and_groups_and_estimates_without_gradient():
    """A new estimator implements only ``estimate``: the base class refuses an experience that
    lacks a declared need or has a wrong group size, and no gradient reaches the advantages."""
    from dvpo_lightning.estimators.base import AdvantageEstimator

    weight = torch.ones((), requires_grad=True)

    class Scaled(AdvantageEstimator):
        needs = frozenset({Need.SCORES, Need.GROUPS})
        group_size = 2

        def estimate(self, exp):
            adv = torch.where(exp.response_mask, exp.scores[:, None] * weight, 0.0)
            return adv, torch.zeros_like(adv)

    mask = torch.ones(4, 3, dtype=torch.bool)
    adv, _ = Scaled()(make_exp(mask, scores=torch.arange(4.0),
                               group_ids=torch.tensor([0, 0, 1, 1])))
    assert not adv.requires_grad and adv[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="Scaled needs 'scores'"):
        Scaled()(make_exp(mask, group_ids=torch.tensor([0, 0, 1, 1])))
    with pytest.raises(ValueError, match=r"Scaled: expected every prompt to have group_size=2"):
        Scaled()(make_exp(mask, scores=torch.zeros(4), group_ids=torch.tensor([0, 0, 0, 1])))
