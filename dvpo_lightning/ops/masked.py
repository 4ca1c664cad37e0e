"""Masked reductions: sum, mean, variance and whitening over the valid positions of a batch.

Every function reads ``x`` only where ``mask`` is True (``torch.where``, not a product, so a NaN
or ``inf`` at a padded position cannot leak into a result). Means, variances and whitening raise
``ValueError`` on an empty mask; sums and moments do not, because an empty shard is a valid
contribution (zero) to a sum that is all-reduced across ranks.

Global statistics across ranks or mini-batches::

    s, s2, n = masked_moments(adv, mask)        # per rank
    # all_reduce(s), all_reduce(s2), all_reduce(n)
    stats = moments_to_mean_var(s, s2, n)
    adv = masked_whiten(adv, mask, stats=stats)

Follows verl ``utils/torch_functional.py`` (``masked_mean``, ``masked_var``, ``masked_whiten``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_mask(x: Tensor, mask: Tensor, fn: str) -> None:
    if mask.shape != x.shape:
        raise ValueError(
            f"{fn}: mask has shape {tuple(mask.shape)} but x has {tuple(x.shape)}; "
            "pass one mask entry per element"
        )


def _count(mask: Tensor, fn: str, dim: int | None = None) -> Tensor:
    """Number of valid entries (over ``dim``), raising when any reduction would be empty."""
    n = mask.sum() if dim is None else mask.sum(dim)
    if (n == 0).any():
        where = "the whole mask" if dim is None else f"{int((n == 0).sum())} slice(s) of dim {dim}"
        raise ValueError(
            f"{fn}: {where} has no True entry, so the mean over valid positions is undefined; "
            "drop empty rows or make sure every reduction has at least one valid position"
        )
    return n


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over positions where ``mask`` is True.

    Args:
        x: ``(...)`` float.
        mask: ``(...)`` bool, same shape as ``x``.
        dim: reduce over this dimension only; ``None`` reduces over everything.

    Returns:
        A 0-d tensor, or ``x`` with ``dim`` removed. An empty mask sums to 0 (no error).
    """
    _check_mask(x, mask, "masked_sum")
    valid = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return valid.sum() if dim is None else valid.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is True: ``Σ m·x / Σ m``.

    Args:
        x: ``(...)`` float.
        mask: ``(...)`` bool, same shape as ``x``.
        dim: reduce over this dimension only; ``None`` reduces over everything.

    Raises:
        ValueError: when the mask (or, with ``dim``, any slice of it) is empty.
    """
    _check_mask(x, mask, "masked_mean")
    n = _count(mask, "masked_mean", dim)
    return masked_sum(x, mask, dim) / n


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over all valid positions: ``Σ m·(x − μ)² / (n − 1)`` (``n`` if biased).

    Args:
        x: ``(...)`` float.
        mask: ``(...)`` bool, same shape as ``x``.
        unbiased: apply Bessel's correction (divide by ``n − 1``), as verl and TRL do.

    Raises:
        ValueError: on an empty mask, or a single valid entry with ``unbiased=True``.
    """
    _check_mask(x, mask, "masked_var")
    n = _count(mask, "masked_var")
    if unbiased and n == 1:
        raise ValueError(
            "masked_var: the mask has exactly 1 True entry, so the unbiased variance divides by "
            "n − 1 = 0; pass unbiased=False or reduce over more positions"
        )
    mean = masked_sum(x, mask) / n
    sq = masked_sum((x - mean) ** 2, mask)
    return sq / (n - 1) if unbiased else sq / n


def masked_whiten(
    x: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    stats: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Whiten ``x`` over its valid positions: ``(x − μ) / √(σ² + eps)``, zero where masked.

    Args:
        x: ``(...)`` float.
        mask: ``(...)`` bool, same shape as ``x``.
        shift_mean: when False the mean is added back (scale only), as in TRL's
            ``masked_whiten(..., shift_mean=False)`` for rewards.
        eps: added to the variance before the square root.
        stats: precomputed ``(mean, var)``, e.g. from :func:`moments_to_mean_var` over all ranks;
            when None they are the local unbiased :func:`masked_mean` / :func:`masked_var`.

    Returns:
        ``(...)`` float, same shape as ``x``, 0 at masked positions.

    Raises:
        ValueError: on an empty mask when ``stats`` is None.
    """
    _check_mask(x, mask, "masked_whiten")
    if stats is None:
        _count(mask, "masked_whiten")
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    else:
        mean, var = stats
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device)
    var = torch.as_tensor(var, dtype=x.dtype, device=x.device)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_moments(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(Σ x, Σ x², n)`` over valid positions, 0-d float64 tensors ready to all-reduce (sum).

    Accumulated in float64 because :func:`moments_to_mean_var` subtracts ``(Σ x)² / n`` from
    ``Σ x²``, which cancels badly in float32 when the mean is large. An empty mask gives zeros
    (a rank or mini-batch may legitimately hold no valid token); the error is raised by
    :func:`moments_to_mean_var` if the *total* count is zero.

    Args:
        x: ``(...)`` float.
        mask: ``(...)`` bool, same shape as ``x``.
    """
    _check_mask(x, mask, "masked_moments")
    x64 = x.detach().to(torch.float64)
    return masked_sum(x64, mask), masked_sum(x64 * x64, mask), mask.sum().to(torch.float64)


def moments_to_mean_var(
    total: Tensor, total_sq: Tensor, count: Tensor, unbiased: bool = True
) -> tuple[Tensor, Tensor]:
    """Mean and variance from summed moments: ``μ = S/n``, ``σ² = (S₂ − S²/n) / (n − 1)``.

    Args:
        total: ``Σ x`` (0-d).
        total_sq: ``Σ x²`` (0-d).
        count: ``n`` (0-d).
        unbiased: divide by ``n − 1`` (matches :func:`masked_var`'s default).

    Returns:
        ``(mean, var)``, 0-d float64; ``var`` is clamped at 0 against round-off.

    Raises:
        ValueError: when ``count`` is 0, or 1 with ``unbiased=True``.
    """
    n = float(count)
    if n <= 0 or (unbiased and n <= 1):
        raise ValueError(
            f"moments_to_mean_var: count is {n:g} but the {'unbiased ' if unbiased else ''}"
            f"variance needs at least {2 if unbiased else 1} valid entries; check the mask, or "
            "pass unbiased=False for a single entry"
        )
    mean = total / count
    var = (total_sq - total * mean) / (count - 1 if unbiased else count)
    return mean, var.clamp(min=0.0)
