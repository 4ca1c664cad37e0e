"""The few collectives the RL update needs, as functions that are no-ops in one process."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from dvpo_lightning.ops.masked import masked_moments
from dvpo_lightning.ops.normalize import advantage_stats, whiten_advantages


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of ``x`` over all processes (a copy; ``x`` itself when there is one process)."""
    return _all_reduce(x, "SUM")


def all_reduce_max(x: Tensor) -> Tensor:
    """Elementwise maximum of ``x`` over all processes (as :func:`all_reduce_sum`)."""
    return _all_reduce(x, "MAX")


def _all_reduce(x: Tensor, op: str) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x, op=getattr(dist.ReduceOp, op))
    return x


def global_whiten(adv: Tensor, mask: Tensor) -> Tensor:
    """Whiten ``adv (B, T)`` with the mean and variance of the valid tokens of *all*
    processes (moments all-reduced), so the result does not depend on the number of ranks."""
    moments = torch.stack([m.to(torch.float64) for m in masked_moments(adv, mask)])
    return whiten_advantages(adv, mask, stats=advantage_stats(tuple(all_reduce_sum(moments))))


def loss_counts(mask: Tensor) -> tuple[float, float]:
    """Token and sequence counts of a mini-batch over all processes, divided by the number of
    processes: DDP averages gradients, so ``Σ_rank S_rank / (N / W)`` averaged over ``W``
    ranks is the single-process loss ``Σ S / N`` of the whole mini-batch."""
    counts = torch.tensor([float(mask.sum()), float(mask.shape[0])], dtype=torch.float64,
                          device=mask.device)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    counts = all_reduce_sum(counts) / world
    return float(counts[0]), float(counts[1])
