"""GRPO: sequence rewards normalised within each group of responses to the same prompt."""

from __future__ import annotations

import torch
from torch import Tensor

from dvpo_lightning.estimators.base import AdvantageEstimator, Need
from dvpo_lightning.ops.groups import group_mean_var
from dvpo_lightning.ops.returns import sequence_rewards
from dvpo_lightning.rollout.experience import Experience

GROUP_SCALES = ("std", "none")


def group_normalized_advantages(
    scores: Tensor, group_ids: Tensor, eps: float = 1e-6, scale: str = "std"
) -> Tensor:
    """GRPO advantage ``A_i = (R_i − mean_g) / (std_g + eps)`` (Shao et al. 2024, §4.1.2).

    ``std_g`` is the unbiased (Bessel) standard deviation of the group, as ``torch.std`` in TRL
    and verl, computed in two passes (:func:`~dvpo_lightning.ops.groups.group_mean_var`).
    ``scale="none"`` drops the division (Dr. GRPO, Liu et al. 2025).

    Args:
        scores: ``(B,)`` float, sequence rewards ``R_i``.
        group_ids: ``(B,)`` long; equal ids share a prompt.
        eps: added to the group std.
        scale: ``"std"`` or ``"none"``.

    Returns:
        ``(B,)`` float (dtype of ``scores``); zero mean within every group.
    """
    if scale not in GROUP_SCALES:
        raise ValueError(
            f"group_normalized_advantages: unknown scale {scale!r}; valid: {GROUP_SCALES}"
        )
    count, mean, var = group_mean_var(scores, group_ids)
    centred = scores.to(torch.float64) - mean
    if scale == "std":
        if (count < 2).any():
            raise ValueError(
                "group_normalized_advantages: a group has a single response, so its std is "
                f"undefined (group sizes: {sorted(set(count.long().tolist()))}); sample >= 2 "
                "responses per prompt or use scale='none'"
            )
        centred = centred / (var.sqrt() + eps)
    return centred.to(scores.dtype)


class GRPO(AdvantageEstimator):
    """Group-relative advantages, broadcast to every valid token of the response.

    ``R_i = score_i − Σ_t kl_penalty_{i,t}``; ``returns`` are zeros (no critic).

    Args:
        group_size: responses sampled per prompt (paper: 5).
        eps: added to the group std.
        scale: "std" divides by the group std (GRPO); "none" only centres (Dr. GRPO).
    """

    needs = frozenset({Need.SCORES, Need.GROUPS})

    def __init__(self, group_size: int = 5, eps: float = 1e-6, scale: str = "std") -> None:
        if group_size < 2:
            raise ValueError(
                f"GRPO: group_size must be >= 2 to normalise a group, got {group_size}"
            )
        if scale not in GROUP_SCALES:
            raise ValueError(f"GRPO: unknown scale {scale!r}; valid: {GROUP_SCALES}")
        self.group_size = group_size
        self.eps = eps
        self.scale = scale

    def estimate(self, exp: Experience) -> tuple[Tensor, Tensor]:
        mask = exp.response_mask
        rewards = sequence_rewards(exp.scores, exp.kl_penalty, mask)
        adv = group_normalized_advantages(rewards, exp.group_ids, self.eps, self.scale)
        advantages = torch.where(mask, adv[:, None], 0.0)
        return advantages, torch.zeros_like(advantages)
