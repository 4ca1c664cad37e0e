"""PPO's actor–critic advantage: GAE over KL-shaped token rewards with a trained critic."""

from __future__ import annotations

from torch import Tensor

from dvpo_lightning.estimators.base import AdvantageEstimator, Need
from dvpo_lightning.ops.returns import gae, token_rewards
from dvpo_lightning.rollout.experience import Experience


def gae_advantages(
    values: Tensor,
    scores: Tensor,
    kl_penalty: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[Tensor, Tensor]:
    """PPO advantages: GAE of the shaped rewards ``r_t = −kl_penalty_t + [t = L]·score``.

    ``δ_t = r_t + γ·V(s_{t+1}) − V(s_t)``, ``A_t = δ_t + γλ·A_{t+1}``, ``returns = A + V``
    (docs/algorithm.md#gae-for-ppo-for-comparison; Ouyang et al. 2022). ``V(s_t) = u_{t−1}``;
    the value after the last token is 0.

    Args:
        values: ``(B, T + 1)`` float, the critic's ``u_0 … u_T``.
        scores: ``(B,)`` float, reward-model score ``r(x, y)``.
        kl_penalty: ``(B, T)`` float, ``β·KL_t`` (zeros when the KL is a loss term).
        mask: ``(B, T)`` bool, response mask.
        gamma: discount γ.
        lam: GAE λ.

    Returns:
        ``(advantages, returns)``, both ``(B, T)``, 0 where masked; ``returns`` are the critic's
        regression targets.
    """
    rewards = token_rewards(scores, kl_penalty, mask)
    return gae(rewards, values.detach(), mask, gamma, lam)


class GAE(AdvantageEstimator):
    """PPO with a critic trained online (the 2× memory baseline of the paper's Table 7).

    Args:
        gamma: discount γ (paper: 1).
        lam: GAE λ (authors' code: 0.95).
    """

    needs = frozenset({Need.CRITIC_VALUES, Need.SCORES})
    trains_critic = True

    def __init__(self, gamma: float = 1.0, lam: float = 0.95) -> None:
        self.gamma = gamma
        self.lam = lam

    def estimate(self, exp: Experience) -> tuple[Tensor, Tensor]:
        return gae_advantages(
            exp.values, exp.scores, exp.kl_penalty, exp.response_mask, self.gamma, self.lam
        )
