"""RLOO: REINFORCE with the mean reward of the other responses to the same prompt as baseline."""

from __future__ import annotations

import torch
from torch import Tensor

from dvpo_lightning.estimators.base import AdvantageEstimator, Need
from dvpo_lightning.ops.groups import group_sums, sizes_of_two_or_more
from dvpo_lightning.ops.returns import sequence_rewards
from dvpo_lightning.rollout.experience import Experience


def rloo_advantages(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """Leave-one-out advantage ``A_i = R_i − (Σ_{j∈g} R_j − R_i) / (n_g − 1)``
    (Kool et al. 2019; Ahmadian et al. 2024, Eq. 7).

    Args:
        rewards: ``(B,)`` float, sequence rewards ``R_i``.
        group_ids: ``(B,)`` long; equal ids share a prompt.

    Returns:
        ``(B,)`` float; sums to zero within every group.
    """
    count, total = group_sums(rewards, group_ids)
    sizes_of_two_or_more(count, "rloo_advantages", "the leave-one-out baseline is undefined")
    r = rewards.to(torch.float64)
    return (r - (total - r) / (count - 1)).to(rewards.dtype)


class RLOO(AdvantageEstimator):
    """RLOO, broadcast to every valid token; ``R_i = score_i − Σ_t kl_penalty_{i,t}``.

    Not in the DVPO paper; a common peer baseline. ``returns`` are zeros (no critic).

    Args:
        group_size: responses sampled per prompt (>= 2).
    """

    needs = frozenset({Need.SCORES, Need.GROUPS})

    def __init__(self, group_size: int = 4) -> None:
        if group_size < 2:
            raise ValueError(
                f"RLOO: group_size must be >= 2 for a leave-one-out baseline, got {group_size}"
            )
        self.group_size = group_size

    def estimate(self, exp: Experience) -> tuple[Tensor, Tensor]:
        mask = exp.response_mask
        adv = rloo_advantages(sequence_rewards(exp.scores, exp.kl_penalty, mask), exp.group_ids)
        advantages = torch.where(mask, adv[:, None], 0.0)
        return advantages, torch.zeros_like(advantages)
