"""The statistics of a study over a few seeds: Student-t confidence intervals, paired
differences with their p-values and Holm's adjustment, a correlation with a seed-clustered
bootstrap interval. Pure Python (no scipy): each function's docstring gives its formula and
its source, and tests/test_stats.py checks it against tabled or hand-computed values.

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
    plus ``wins`` (seeds where ``a > b``), ``seeds`` and ``p``, the two-sided paired-t
    p-value (:func:`paired_t_p`; None for one seed); None when no seed is shared.

    Its ``ci95`` is the paired t-interval: when it excludes 0, ``p < 0.05`` — for this one
    comparison, on these seeds (nothing is said about seeds not drawn). A report making
    several comparisons adjusts the ``p`` of all of them together (:func:`holm`).
    """
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    return {**summarize(diffs), "wins": sum(d > 0 for d in diffs), "seeds": seeds,
            "p": paired_t_p(diffs)}


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


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function ``I_x(a, b) = B(x; a, b) / B(a, b)``.

    Evaluated by its continued fraction (DLMF 8.17.22; Numerical Recipes, 3rd ed., §6.4,
    ``betai``/``betacf``) with the modified Lentz method, on the side where it converges
    fast: for ``x > (a + 1) / (a + b + 2)`` through the symmetry
    ``I_x(a, b) = 1 − I_{1−x}(b, a)`` (DLMF 8.17.4). The prefactor is
    ``x^a (1 − x)^b / (a B(a, b))`` with ``B`` from ``math.lgamma``. Accurate to about 1e-12.
    """
    if a <= 0 or b <= 0:
        raise ValueError(f"betainc: a={a}, b={b}; both must be > 0")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc: x={x} is outside [0, 1]")
    if x == 0.0 or x == 1.0:
        return x
    if x > (a + 1) / (a + b + 2):
        return 1.0 - betainc(b, a, 1.0 - x)
    log_front = (a * math.log(x) + b * math.log1p(-x)
                 + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b))
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 10_000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),            # d_{2m}
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # d_{2m+1}
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < eps:
            break
    return math.exp(log_front) * f / a


def t_sf2(t: float, df: float) -> float:
    """Two-sided tail probability of Student's t with ``df`` degrees of freedom,
    ``P(|T| ≥ |t|) = I_{df/(df + t²)}(df/2, 1/2)`` (Abramowitz & Stegun 26.7.1 with 26.5.27;
    DLMF 8.17.1). ``t = ±inf`` gives 0."""
    if df <= 0:
        raise ValueError(f"df={df}: Student's t needs df > 0")
    if math.isinf(t):
        return 0.0
    return betainc(df / 2, 0.5, df / (df + t * t))


def t_cdf(t: float, df: float) -> float:
    """``P(T ≤ t)`` for Student's t with ``df`` degrees of freedom: ``1 − p/2`` for
    ``t ≥ 0`` and ``p/2`` below, ``p`` the two-sided tail :func:`t_sf2`."""
    p = t_sf2(t, df)
    return 1.0 - p / 2 if t >= 0 else p / 2


def paired_t_p(diffs: list[float]) -> float | None:
    """The two-sided paired-t p-value of mean ``diffs`` = 0: ``t = mean / (std / √n)``,
    ``p = P(|T_{n−1}| ≥ |t|)`` (:func:`t_sf2`). None with fewer than two differences (no
    spread to test against); with zero spread, 1 when every difference is 0, else 0."""
    n = len(diffs)
    if n < 2:
        return None
    mean = sum(diffs) / n
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    if std == 0.0:
        return 1.0 if mean == 0.0 else 0.0
    return t_sf2(mean / (std / math.sqrt(n)), n - 1)


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of a family of p-values (Holm 1979, *Scand. J. Statist.*
    6:65–70), in the input's order; None (no test) stays None and is not counted.

    With the m p-values sorted, ``p_(1) ≤ … ≤ p_(m)``, the adjusted
    ``p̃_(i) = max_{j ≤ i} min(1, (m − j + 1) · p_(j))``: monotone in ``p``, capped at 1,
    and ``p̃ ≤ α`` rejects with family-wise error at most ``α`` under any dependence.
    """
    idx = sorted((i for i, p in enumerate(pvalues) if p is not None),
                 key=lambda i: pvalues[i])
    m, out, running = len(idx), list(pvalues), 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def percentile(values: list[float], q: float) -> float:
    """The ``q``-quantile (0 ≤ q ≤ 1) of ``values`` by linear interpolation between order
    statistics, ``x_(⌊h⌋) + (h − ⌊h⌋)(x_(⌊h⌋+1) − x_(⌊h⌋))`` with ``h = (n − 1) q``
    (Hyndman & Fan 1996, definition 7; numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    xs = sorted(values)
    h = (len(xs) - 1) * q
    lo = math.floor(h)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (h - lo) * (xs[hi] - xs[lo])


def cluster_bootstrap_pearson(x: list[float], y: list[float], clusters: list,
                              resamples: int = 2000, seed: int = 0) -> dict:
    """Pearson's r of ``x`` and ``y`` with a cluster-bootstrap percentile 95 % interval.

    Points that share a cluster (a seed: every variant of one seed shares its stage-1 draw)
    are not independent, so each resample draws the *clusters* with replacement and takes all
    their points together (Davison & Hinkley 1997, *Bootstrap Methods*, §3.8; Field & Welsh
    2007, JRSS B 69:369); r of each resample, and the 2.5 % and 97.5 % percentiles
    (:func:`percentile`) of the ``resamples`` r values. The RNG is ``random.Random(seed)``:
    the same inputs give the same interval.

    Returns ``{"r", "lo", "hi", "clusters", "resamples", "skipped"}``: ``lo``/``hi`` None
    with fewer than 2 clusters, when r is undefined, or when no resample had an r;
    ``skipped`` counts the resamples whose points had no spread (r undefined), left out.
    """
    import random

    if not len(x) == len(y) == len(clusters):
        raise ValueError(f"cluster_bootstrap_pearson: {len(x)} x, {len(y)} y and "
                         f"{len(clusters)} cluster labels; one of each per point")
    r = pearson(x, y)
    groups: dict = {}
    for i, c in enumerate(clusters):
        groups.setdefault(c, []).append(i)
    keys = list(groups)
    out = {"r": r, "lo": None, "hi": None, "clusters": len(keys), "resamples": 0,
           "skipped": 0}
    if r is None or len(keys) < 2:
        return out
    rng = random.Random(seed)
    rs = []
    for _ in range(resamples):
        idx = [i for c in rng.choices(keys, k=len(keys)) for i in groups[c]]
        rb = pearson([x[i] for i in idx], [y[i] for i in idx])
        if rb is None:
            out["skipped"] += 1
        else:
            rs.append(rb)
    out["resamples"] = len(rs)
    if rs:
        out["lo"], out["hi"] = percentile(rs, 0.025), percentile(rs, 0.975)
    return out
