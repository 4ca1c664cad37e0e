"""Normalisation steps applied after an estimator, each behind its own flag in the RL module.

Kept apart from the estimators (GAE never whitens inside): the module decides, and a config
says, whether advantages are whitened, and over which statistics (local batch, or global ones
from :func:`~dvpo_lightning.ops.masked.masked_moments` all-reduced across ranks).
"""

from __future__ import annotations

from torch import Tensor

from dvpo_lightning.ops.masked import masked_moments, masked_whiten, moments_to_mean_var

__all__ = ["advantage_stats", "masked_moments", "whiten_advantages"]


def whiten_advantages(
    advantages: Tensor,
    mask: Tensor,
    stats: tuple[Tensor, Tensor] | None = None,
    shift_mean: bool = True,
) -> Tensor:
    """Batch whitening ``(A − μ) / √(σ² + 1e-8)`` over valid tokens (TRL / OpenRLHF default).

    Args:
        advantages: ``(B, T)`` float.
        mask: ``(B, T)`` bool.
        stats: global ``(mean, var)``, e.g. from :func:`advantage_stats` after an all-reduce;
            None uses this batch's own statistics.
        shift_mean: False rescales without centring.

    Returns:
        ``(B, T)`` float, 0 where masked.
    """
    return masked_whiten(advantages, mask, shift_mean=shift_mean, stats=stats)


def advantage_stats(moments: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """``(mean, var)`` from (all-reduced) :func:`~dvpo_lightning.ops.masked.masked_moments`.

    Args:
        moments: ``(Σ A, Σ A², n)``, summed over ranks.
    """
    return moments_to_mean_var(*moments)

