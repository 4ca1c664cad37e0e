"""Per-group statistics of sequence rewards (responses with equal ``group_ids`` share a prompt),
vectorised for any id order and computed in float64."""

from __future__ import annotations

import torch
from torch import Tensor


def group_sums(values: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's group size and the sum of its group's values.

    Args:
        values: ``(B,)`` float.
        group_ids: ``(B,)`` long; equal ids share a prompt.

    Returns:
        ``(count, total)``, each ``(B,)`` float64: the statistic of the row's own group.
    """
    _, inverse = torch.unique(group_ids, return_inverse=True)  # (B,) group index per row
    n_groups = int(inverse.max()) + 1
    v = values.to(torch.float64)

    def per_group(x: Tensor) -> Tensor:
        return torch.zeros(n_groups, dtype=x.dtype, device=x.device).index_add_(0, inverse, x)

    return per_group(torch.ones_like(v))[inverse], per_group(v)[inverse]


def sizes_of_two_or_more(count: Tensor, who: str, why: str) -> None:
    """Refuse a group of one response: ``count`` ``(B,)`` from :func:`group_sums`; ``who`` and
    ``why`` (what a single response breaks) name it in the message."""
    if (count < 2).any():
        raise ValueError(
            f"{who}: a group has a single response, so {why} (group sizes: "
            f"{sorted(set(count.long().tolist()))}); sample >= 2 responses per prompt")


def group_mean_var(values: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each row's group size, mean and unbiased (Bessel) variance, in two passes.

    ``var_g = Σ_{j∈g} (x_j − mean_g)² / (n_g − 1)``: the squares are of the deviations from the
    mean, not ``Σx² − n·mean²``, which cancels catastrophically when the values are large and
    nearly tied (scores of 1e4 ± 1e-2 lose every significant digit of their spread).

    Args:
        values: ``(B,)`` float.
        group_ids: ``(B,)`` long; equal ids share a prompt.

    Returns:
        ``(count, mean, var)``, each ``(B,)`` float64; ``var`` is NaN for a group of one.
    """
    count, total = group_sums(values, group_ids)
    mean = total / count
    centred = values.to(torch.float64) - mean
    _, sq = group_sums(centred * centred, group_ids)
    return count, mean, sq / (count - 1)
