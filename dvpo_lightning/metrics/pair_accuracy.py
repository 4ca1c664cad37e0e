"""Held-out pair accuracy of a value or reward model (paper App. E/G, Tables 3, 4, 8, 9).

Each response's token values are reduced to one number — their mean, the final value, or a
percentile over tokens — and a pair counts as right when the chosen response's number is the
larger. A tie counts one half, so a constant model scores exactly chance (0.5).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

AGGREGATIONS = ("mean", "final", "p1", "p5", "p10", "p90", "p95", "p99")


def aggregate_token_values(values: Tensor, mask: Tensor, how: str) -> Tensor:
    """Reduce ``(N, T)`` token values over the True positions of ``mask (N, T)`` to ``(N,)``.

    ``how``: ``mean``; ``final`` (the value at the last True position); ``pXX`` (the XX-th
    percentile over tokens, linear interpolation).
    """
    if not bool(mask.any(dim=1).all()):
        raise ValueError("aggregate_token_values: a row has no valid token; every response "
                         "needs at least one token (its EOS)")
    values = values.float()
    if how == "mean":
        return values.masked_fill(~mask, 0.0).sum(1) / mask.sum(1)  # padding may hold inf/nan
    if how == "final":
        last = mask.long().sum(1) - 1
        return values.gather(1, last[:, None]).squeeze(1)
    if how.startswith("p") and how[1:].isdigit():
        q = int(how[1:]) / 100.0
        return torch.nanquantile(values.masked_fill(~mask, float("nan")), q, dim=1)
    raise ValueError(f"unknown aggregation {how!r}; valid: {AGGREGATIONS}")


class PairAccuracy(Metric):
    """Fraction of pairs whose chosen response gets the larger aggregated value, per aggregation.

    Args:
        aggregations: the reductions to score (default: all of :data:`AGGREGATIONS`).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, aggregations: tuple[str, ...] = AGGREGATIONS) -> None:
        super().__init__()
        for how in aggregations:
            if how not in AGGREGATIONS:
                raise ValueError(f"unknown aggregation {how!r}; valid: {AGGREGATIONS}")
        self.aggregations = tuple(aggregations)
        self.add_state("correct", torch.zeros(len(aggregations), dtype=torch.float64),
                       dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, chosen: Tensor, chosen_mask: Tensor, rejected: Tensor,
               rejected_mask: Tensor) -> None:
        """``chosen``/``rejected``: ``(N, T)`` token values with ``(N, T) bool`` masks."""
        scores = []
        for how in self.aggregations:
            c = aggregate_token_values(chosen, chosen_mask, how)
            r = aggregate_token_values(rejected, rejected_mask, how)
            scores.append(((c > r).double() + 0.5 * (c == r).double()).sum())
        self.correct += torch.stack(scores).to(self.correct)
        self.total += chosen.shape[0]

    def compute(self) -> dict[str, Tensor]:
        if self.total == 0:
            raise ValueError("PairAccuracy.compute: no pair was seen; the validation set is empty")
        return {how: self.correct[i] / self.total for i, how in enumerate(self.aggregations)}
