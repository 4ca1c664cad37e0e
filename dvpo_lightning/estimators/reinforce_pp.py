"""REINFORCE++ and REINFORCE++-baseline: KL-shaped returns-to-go, whitened over the global batch.

Hu et al. 2025, "REINFORCE++" (arXiv 2501.03262); OpenRLHF ``--algo.advantage.estimator
reinforce`` / ``reinforce_baseline``; verl ``compute_reinforce_plus_plus_outcome_advantage`` /
``compute_reinforce_plus_plus_baseline_outcome_advantage``.

The last step of both, whitening over every valid token of the *global* batch, needs the
statistics of every process; an estimator makes no distributed call, so these return the
returns-to-go ``G`` and set ``whitens = True``, and the RL module applies
:func:`~dvpo_lightning.runtime.distributed.global_whiten` to them (once, whatever
``ppo.whiten_advantages`` says). No critic is trained: ``returns`` are zeros.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dvpo_lightning.estimators.base import AdvantageEstimator, Need
from dvpo_lightning.ops.groups import group_sums, sizes_of_two_or_more
from dvpo_lightning.ops.returns import lambda_returns, token_rewards
from dvpo_lightning.rollout.experience import Experience


def reinforce_pp_returns(
    scores: Tensor, kl_penalty: Tensor, mask: Tensor, gamma: float = 1.0
) -> Tensor:
    """REINFORCE++'s advantage before whitening: the discounted return-to-go of the shaped rewards.

    ``r_t = −kl_penalty_t + [t = L]·score`` (``L`` the last valid token),
    ``G_t = Σ_{s=t}^{L} γ^{s−t}·r_s``; with γ = 1, ``G_t = score − Σ_{s≥t} β·KL_s``, the paper's
    ``A_t = r(x, y) − β·Σ_{i=t}^{T} KL(i)``. The advantage is then ``G`` whitened over all
    valid tokens of the global batch (the paper's global advantage normalisation), which the
    RL module does.

    Args:
        scores: ``(B,)`` float, ``r(x, y)`` (or, for the baseline variant, the group-centred score).
        kl_penalty: ``(B, T)`` float, ``β·KL_t`` (zeros when the KL is a loss term).
        mask: ``(B, T)`` bool, response mask (right padded).
        gamma: discount γ.

    Returns:
        ``(B, T)`` float, ``G_t``; 0 where masked.
    """
    rewards = token_rewards(scores, kl_penalty, mask)
    return lambda_returns(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)


def group_centred_scores(scores: Tensor, group_ids: Tensor) -> Tensor:
    """REINFORCE++-baseline's baseline: ``score_i − mean_{j∈g(i)} score_j`` (computed in float64).

    Args:
        scores: ``(B,)`` float, ``r(x, y_i)``.
        group_ids: ``(B,)`` long; equal ids share a prompt.

    Returns:
        ``(B,)`` float (dtype of ``scores``); zero mean within every group.
    """
    count, total = group_sums(scores, group_ids)
    sizes_of_two_or_more(count, "group_centred_scores",
                         "its mean baseline is the response's own score")
    return (scores.to(torch.float64) - total / count).to(scores.dtype)


def _check_gamma(gamma: float, who: str) -> None:
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"{who}: gamma must be in [0, 1], got {gamma}")


class REINFORCEPP(AdvantageEstimator):
    """REINFORCE++: one response per prompt, no baseline but the global whitening.

    ``advantages = whiten_global(G)`` with ``G`` from :func:`reinforce_pp_returns`; this
    estimator returns ``G`` and the RL module whitens it (``whitens = True``).

    Same as OpenRLHF ``reinforce`` and verl ``reinforce_plus_plus`` (the shaped rewards, the
    return-to-go, the whitening that subtracts the mean); the only difference is OpenRLHF's
    variance, biased (``/n``) with ``rsqrt(max(σ², 1e-8))``, where this (like verl) uses the
    unbiased one and ``rsqrt(σ² + 1e-8)``: a factor ``√((n−1)/n)`` on ``n`` tokens.

    Args:
        gamma: discount γ of the return-to-go (paper and both libraries' default: 1).
    """

    needs = frozenset({Need.SCORES})
    whitens = True

    def __init__(self, gamma: float = 1.0) -> None:
        _check_gamma(gamma, "REINFORCEPP")
        self.gamma = gamma

    def estimate(self, exp: Experience) -> tuple[Tensor, Tensor]:
        g = reinforce_pp_returns(exp.scores, exp.kl_penalty, exp.response_mask, self.gamma)
        return g, torch.zeros_like(g)


class REINFORCEPPBaseline(AdvantageEstimator):
    """REINFORCE++-baseline: the group-centred score in place of the score, then as REINFORCE++.

    ``G`` of :func:`reinforce_pp_returns` on ``score_i − mean_g(score)``
    (:func:`group_centred_scores`) and the per-token KL rewards; the RL module whitens it over
    the global batch (``whitens = True``). This is OpenRLHF's ``reinforce_baseline``: the group
    mean is taken of the raw scores, *before* the KL rewards are added, and the KL keeps its
    per-token return-to-go.

    Differs from verl's ``reinforce_plus_plus_baseline``, which centres the KL-shaped
    *sequence* reward ``score − Σ_t β·KL_t`` within the group and puts that one number on
    every token (no return-to-go, γ unused), and gives a prompt with a single response its
    uncentred reward. The two agree when the KL is a loss term (zero KL rewards) and γ = 1.
    Differs from OpenRLHF in the variance of the whitening (see :class:`REINFORCEPP`) and in
    γ: OpenRLHF overrides any γ ≠ 1 to 1 for this estimator; here γ is honoured.

    Args:
        group_size: responses sampled per prompt (>= 2).
        gamma: discount γ of the return-to-go (1 in OpenRLHF and the paper).
    """

    needs = frozenset({Need.SCORES, Need.GROUPS})
    whitens = True

    def __init__(self, group_size: int = 4, gamma: float = 1.0) -> None:
        if group_size < 2:
            raise ValueError(
                f"REINFORCEPPBaseline: group_size must be >= 2 for a group-mean baseline, got "
                f"{group_size}; use REINFORCEPP for one response per prompt"
            )
        _check_gamma(gamma, "REINFORCEPPBaseline")
        self.group_size = group_size
        self.gamma = gamma

    def estimate(self, exp: Experience) -> tuple[Tensor, Tensor]:
        centred = group_centred_scores(exp.scores, exp.group_ids)
        g = reinforce_pp_returns(centred, exp.kl_penalty, exp.response_mask, self.gamma)
        return g, torch.zeros_like(g)
