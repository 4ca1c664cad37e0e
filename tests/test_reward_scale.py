"""One reward scale for every method (``model.reward.normalize: first_rollout``): the frozen
scorer standardised on the first rollout, frozen after, so β is the same pressure whatever the
scorer's own scale. Checked by hand, by invariance (a scorer and any positive affine map of it
give the same advantages) and through a real Trainer."""

from __future__ import annotations

import pytest
import torch

from dvpo_lightning.estimators import GVM, ReMax
from dvpo_lightning.modules.optim import RLOptimSettings
from dvpo_lightning.modules.reward_scale import (
    RewardScale,
    RewardSettings,
    sequence_reward,
    standardise_moments,
)
from dvpo_lightning.rollout.experience import Experience, Need
from tests.test_rl_step import B, T, fit, fixed_rollout, module_and_source

GVM_NEEDS = frozenset({Need.GVM_VALUES})
RM_NEEDS = frozenset({Need.SCORES})


def experience(**fields) -> Experience:
    seq = fixed_rollout()
    zeros = torch.zeros(B, T)
    return Experience(*seq, zeros, zeros, **fields)


def test_first_rollout_fixes_the_map_by_hand():
    scale = RewardScale(RewardSettings("first_rollout"))
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0])  # mean 3, unbiased std √(14/3)
    out = scale(experience(scores=scores, baseline_scores=torch.full((B,), 3.0)), RM_NEEDS)
    std = (14 / 3) ** 0.5
    torch.testing.assert_close(out.scores, (scores - 3.0) / std)
    torch.testing.assert_close(out.baseline_scores, torch.zeros(B))
    # frozen after the first rollout: a later batch is mapped, not refitted
    later = scale(experience(scores=torch.full((B,), 10.0)), RM_NEEDS)
    torch.testing.assert_close(later.scores, torch.full((B,), 7.0 / std))
    assert scale.state_dict() == {"mean": 3.0, "std": pytest.approx(std)}


def test_gvm_values_are_mapped_from_the_final_value_and_critic_values_never():
    values = torch.arange(B * (T + 1), dtype=torch.float32).reshape(B, T + 1)
    exp = experience(values=values)
    u_final = sequence_reward(exp, GVM_NEEDS)
    lengths = exp.response_mask.sum(1)
    torch.testing.assert_close(u_final, values[torch.arange(B), lengths])
    out = RewardScale(RewardSettings("first_rollout"))(exp, GVM_NEEDS)
    mean, std = float(u_final.mean()), float(u_final.std())
    torch.testing.assert_close(out.values, (values - mean) / std)
    # a critic's values are the trained critic's, not a reward: left alone
    critic = RewardScale(RewardSettings("first_rollout"))(exp, frozenset({Need.CRITIC_VALUES}))
    assert critic.values is values
    assert sequence_reward(exp, frozenset({Need.CRITIC_VALUES})) is None


def test_none_changes_nothing():
    exp = experience(scores=torch.randn(B))
    assert RewardScale()(exp, RM_NEEDS) is exp


@pytest.mark.parametrize("a,b", [(0.1, 0.0), (7.0, -3.0), (1.0, 100.0)])
def test_any_positive_affine_scorer_gives_the_same_advantages(a, b):
    """β acts on the same reward whatever the scorer's scale: DVPO's advantages (KL in the
    reward) and ReMax's are the same for a scorer ``r`` and for ``a·r + b``."""
    g = torch.Generator().manual_seed(0)
    values, scores = torch.randn(B, T + 1, generator=g), torch.randn(B, generator=g)
    baseline, kl = torch.randn(B, generator=g), 0.05 * torch.rand(B, T, generator=g)

    def advantages(estimator, needs, **fields):
        exp = RewardScale(RewardSettings("first_rollout"))(experience(kl_penalty=kl, **fields),
                                                           needs)
        return estimator(exp)[0]

    base = advantages(GVM(version="value_difference"), GVM_NEEDS, values=values)
    moved = advantages(GVM(version="value_difference"), GVM_NEEDS, values=a * values + b)
    torch.testing.assert_close(moved, base, atol=1e-5, rtol=1e-5)
    remax = ReMax()
    base = advantages(remax, RM_NEEDS | {Need.GREEDY_BASELINE}, scores=scores,
                      baseline_scores=baseline)
    moved = advantages(remax, RM_NEEDS | {Need.GREEDY_BASELINE}, scores=a * scores + b,
                       baseline_scores=a * baseline + b)
    torch.testing.assert_close(moved, base, atol=1e-5, rtol=1e-5)
    if a == 1.0:
        return
    # without the map the KL's weight against the reward changes with the scale
    raw = GVM(version="value_difference")(experience(kl_penalty=kl, values=a * values))[0]
    assert not torch.allclose(raw, GVM(version="value_difference")(
        experience(kl_penalty=kl, values=values))[0], atol=1e-3)


def test_moments_in_one_process():
    x = torch.tensor([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0])
    mean, std = standardise_moments(x)
    assert mean == pytest.approx(5.0) and std == pytest.approx(float(x.std()))


def test_settings_refuse_an_unknown_mode():
    with pytest.raises(ValueError, match="model.init_args.reward.normalize='batch' is not one of"):
        RewardSettings("batch")
    with pytest.raises(ValueError, match="min_std=0"):
        RewardSettings(min_std=0)


def test_the_rl_module_fits_the_scale_on_its_first_rollout(tmp_path):
    module, source = module_and_source(reward=RewardSettings("first_rollout"),
                                       optim=RLOptimSettings(lr=1e-3))
    fit(module, 3, tmp_path)
    u_final = sequence_reward(experience(values=source.values), GVM_NEEDS)
    state = module.reward_scale.state_dict()
    assert state["mean"] == pytest.approx(float(u_final.mean()))
    assert state["std"] == pytest.approx(float(u_final.std()))
    assert module.summary()["reward_scale"] == {"normalize": "first_rollout", **state}
    # a resumed run maps with the saved scale, not one refitted on its own first rollout
    resumed, _ = module_and_source(reward=RewardSettings("first_rollout"))
    resumed.reward_scale.load_state_dict(state)
    exp = resumed.reward_scale(experience(values=source.values + 5.0), GVM_NEEDS)
    assert resumed.reward_scale.state_dict() == state
    torch.testing.assert_close(exp.values, (source.values + 5.0 - state["mean"]) / state["std"])
