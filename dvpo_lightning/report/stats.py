"""The statistics of a study over a few seeds: Student-t confidence intervals, paired
differences, a correlation.

With 3–5 seeds a mean ± std says little about whether two methods differ; the report gives
each mean a 95 % confidence interval and compares methods by their *paired* difference, seed
by seed — the seeds share everything upstream (the stage-1 draw when the pipeline's
``seed_scope`` is ``pipeline``), so the pairing removes the variance they share.
"""

from __future__ import annotations

import math

# Two-sided 95 % quantiles of Student's t, t_{0.975, df}, df = 1 … 30 (standard tables).
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
        2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
        2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    """``t_{0.975, df}``: the table above for df ≤ 30, else the Cornish–Fisher expansion
    around the normal quantile z = 1.959964 to second order,
    ``z + (z³ + z) / (4 df) + (5z⁵ + 16z³ + 3z) / (96 df²)`` (within 0.001 of the exact
    value for df > 30)."""
    if df < 1:
        raise ValueError(f"df={df}: a t quantile needs at least 1 degree of freedom")
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def summarize(values: list[float]) -> dict:
    """``{"mean", "std", "ci95", "n", "values"}`` of ``values``.

    ``std`` is the sample standard deviation (0 for one value); ``ci95`` the half-width of
    the 95 % Student-t interval of the mean, ``t_{0.975, n−1} · std / √n`` (None for one
    value: no interval).
    """
    n = len(values)
    if n == 0:
        raise ValueError("summarize needs at least one value")
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    ci = t975(n - 1) * std / math.sqrt(n) if n > 1 else None
    return {"mean": mean, "std": std, "ci95": ci, "n": n, "values": list(values)}


def paired_difference(a: dict[int, float], b: dict[int, float]) -> dict | None:
    """``a − b`` seed by seed over the seeds both have: :func:`summarize` of the differences,
    plus ``wins`` (seeds where ``a > b``) and ``seeds``; None when no seed is shared.

    Its ``ci95`` is the paired t-interval: when it excludes 0, the two differ at the 5 %
    level on these seeds (nothing is said about seeds not drawn).
    """
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    return {**summarize(diffs), "wins": sum(d > 0 for d in diffs), "seeds": seeds}


def pearson(x: list[float], y: list[float]) -> float | None:
    """Pearson's correlation of ``x`` and ``y`` (None with fewer than 3 points or no
    spread)."""
    n = len(x)
    if n != len(y):
        raise ValueError(f"pearson: {n} x values against {len(y)} y values")
    if n < 3:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((u - mx) * (v - my) for u, v in zip(x, y))
    sxx = sum((u - mx) ** 2 for u in x)
    syy = sum((v - my) ** 2 for v in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None
