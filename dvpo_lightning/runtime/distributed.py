"""The few collectives the RL update needs, as functions that are no-ops in one process, and
each process's own random stream for sampling."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from dvpo_lightning.ops.masked import masked_moments
from dvpo_lightning.ops.normalize import advantage_stats, whiten_advantages


def rank_and_world() -> tuple[int, int]:
    """``(this process's rank, number of processes)``; ``(0, 1)`` without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_seeds(n: int) -> Tensor:
    """``(n,)`` seeds for this process's ``n`` sampled requests: ``world × n`` are drawn from
    torch's global RNG (the same draw on every process, so the processes' global RNGs stay in
    step and a checkpoint's RNG state is every rank's) and this rank keeps its slice. With one
    process this is exactly ``torch.randint(0, 2**31 - 1, (n,))``. ``n`` must be the same on
    every process (Lightning's samplers give every rank as many prompts)."""
    rank, world = rank_and_world()
    return torch.randint(0, 2**31 - 1, (world * n,))[rank * n:(rank + 1) * n]


@contextlib.contextmanager
def rank_rng(device: torch.device) -> Iterator[None]:
    """Within the block, torch's generators of the CPU and of ``device`` (a GPU) draw from
    this process's own stream; after it they are as before. Every process draws ``world``
    seeds from the global RNG (the same draw on every process, so the global RNGs stay in
    step) and seeds the block with the rank's. With one process it does nothing: sampling
    draws from the global RNG, as it always has."""
    rank, world = rank_and_world()
    if world == 1:
        yield
        return
    seed = int(torch.randint(0, 2**31 - 1, (world,))[rank])
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()
             ) if cuda else None
    with torch.random.fork_rng(devices=[index] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of ``x`` over all processes (a copy; ``x`` itself when there is one process)."""
    return _all_reduce(x, "SUM")


def all_reduce_max(x: Tensor) -> Tensor:
    """Elementwise maximum of ``x`` over all processes (as :func:`all_reduce_sum`)."""
    return _all_reduce(x, "MAX")


def _all_reduce(x: Tensor, op: str) -> Tensor:
    if rank_and_world()[1] > 1:
        x = x.clone()
        dist.all_reduce(x, op=getattr(dist.ReduceOp, op))
    return x


def global_mean(x: Tensor) -> tuple[float, int]:
    """The mean of ``x (B,)`` over every process's rows, and how many rows that is. One
    process: ``x.mean()`` itself; several: the all-reduced sum (float64) over the all-reduced
    count, the same number on every rank."""
    if rank_and_world()[1] == 1:
        return float(x.mean()), int(x.shape[0])
    total, count = all_reduce_sum(torch.stack([x.detach().double().sum(), torch.tensor(
        float(x.shape[0]), dtype=torch.float64, device=x.device)])).tolist()
    return total / count, int(count)


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
    world = rank_and_world()[1]
    counts = all_reduce_sum(counts) / world
    return float(counts[0]), float(counts[1])


def gather_by_index(rows: dict[str, Tensor], index: Tensor) -> dict[str, Tensor]:
    """Per-item rows of every process, one per distinct ``index``, in index order.

    Args:
        rows: ``{name: (n,)}`` this process's rows (any dtype).
        index: ``(n,) long``, each row's item (its prompt's row in the held-out file).

    Returns:
        ``{name: (N,)}`` on ``rows``' devices, ``N`` the distinct indices of all processes; an
        index met more than once (Lightning's ``DistributedSampler`` repeats a few items to
        even out the shards) keeps its first row, the lowest rank's.
    """
    parts = [(index, rows)]
    world = rank_and_world()[1]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, (index.cpu(), {k: v.cpu() for k, v in rows.items()}))
    every = torch.cat([i.to(index.device) for i, _ in parts])
    distinct, inverse = torch.unique(every, return_inverse=True)  # sorted
    first = torch.full((len(distinct),), len(every), dtype=torch.long, device=every.device)
    first.scatter_reduce_(0, inverse, torch.arange(len(every), device=every.device), "amin")
    return {k: torch.cat([r[k].to(v.device) for _, r in parts])[first.to(v.device)]
            for k, v in rows.items()}
