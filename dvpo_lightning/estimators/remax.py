"""ReMax: REINFORCE with the reward of the greedy response as baseline."""

from __future__ import annotations

import torch
from torch import Tensor

from dvpo_lightning.estimators.base import AdvantageEstimator, Need
from dvpo_lightning.ops.returns import sequence_rewards
from dvpo_lightning.rollout.experience import Experience


def remax_advantages(
    scores: Tensor, baseline_scores: Tensor, kl_penalty: Tensor, mask: Tensor
) -> Tensor:
    """``A_i = R_i − r(x, ŷ_greedy)`` on every valid token, ``R_i = score_i − Σ_t kl_penalty_{i,t}``
    (Li et al. 2024, Alg. 1).

    The baseline carries no KL term: the greedy response's log-probabilities are not
    computed (it is scored only), as in the ReMax paper. With a KL penalty in the reward the
    advantage is therefore shifted by ``−Σ KL`` relative to the pure score difference.

    Args:
        scores: ``(B,)`` float, ``r(x, y_i)``.
        baseline_scores: ``(B,)`` float, ``r(x, ŷ_greedy)`` of the same prompt.
        kl_penalty: ``(B, T)`` float.
        mask: ``(B, T)`` bool.

    Returns:
        ``(B, T)`` float, 0 where masked.
    """
    adv = sequence_rewards(scores, kl_penalty, mask) - baseline_scores  # (B,)
    return torch.where(mask, adv[:, None], 0.0)


class ReMax(AdvantageEstimator):
    """ReMax: one sampled and one greedy response per prompt; ``returns`` are zeros (no critic)."""

    needs = frozenset({Need.SCORES, Need.GREEDY_BASELINE})

    def estimate(self, exp: Experience) -> tuple[Tensor, Tensor]:
        advantages = remax_advantages(
            exp.scores, exp.baseline_scores, exp.kl_penalty, exp.response_mask
        )
        return advantages, torch.zeros_like(advantages)
