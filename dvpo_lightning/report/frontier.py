"""Gold reward against KL over a grid of β: each method's frontier, and its gold reward at
*matched* KL, so methods are compared at the same distance from the reference rather than at
one β (which is a different pressure for each estimator; docs/study.md#one-reward-scale).

A point is one run: its method, β, seed, and its final held-out KL to the reference and gold
reward. For one (method, seed) the runs over β trace a curve; its gold reward at a KL level is
read off by linear interpolation in ``log KL`` between the two runs that bracket the level
(never extrapolated: a level outside a seed's range has no value). The matched levels lie
inside the range of *every* (method, seed), so every comparison is paired seed by seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from dvpo_lightning.report.runs import Run, mean_std
from dvpo_lightning.report.stats import paired_difference


@dataclass(frozen=True)
class Point:
    """One run on the reward–KL plane.

    Args:
        method: the method (grid points of one method share it).
        beta: its KL coefficient β.
        seed: its seed.
        kl: its final held-out KL to the reference (nats per response).
        gold: its final held-out gold reward.
    """

    method: str
    beta: float
    seed: int
    kl: float
    gold: float


def final_measures(run: Run, split: str = "test") -> dict:
    """The run's final evaluation: on the test prompts (``test_eval``) when ``split`` is
    ``test`` and the run has one, else its last validation (``final_eval``)."""
    return run.final if split == "test" else run.validation


def points_from_runs(runs: Iterable[Run], method_of: Callable[[str], str] = lambda m: m,
                     split: str = "test") -> list[Point]:
    """One :class:`Point` per run: ``method_of(run name)`` its method, the summary's
    ``kl_coef`` its β, :func:`final_measures` its KL and gold reward."""
    out = []
    for r in runs:
        m = final_measures(r, split)
        out.append(Point(method_of(r.method), float(r.summary["kl_coef"]), r.seed,
                         float(m["eval/kl_to_ref"]), float(m["eval/gold_reward"])))
    return out


def curves(points: Iterable[Point]) -> dict[str, dict[int, list[tuple[float, float]]]]:
    """``{method: {seed: [(kl, gold), …] sorted by KL}}``."""
    out: dict[str, dict[int, list[tuple[float, float]]]] = {}
    for p in points:
        out.setdefault(p.method, {}).setdefault(p.seed, []).append((p.kl, p.gold))
    for seeds in out.values():
        for s in seeds:
            seeds[s].sort()
    return out


def gold_at_kl(curve: list[tuple[float, float]], level: float) -> float | None:
    """Gold reward at KL ``level`` on one seed's curve ``[(kl, gold), …]`` sorted by KL:
    linear in ``log KL`` between the bracketing runs; the run's own value at a grid point;
    None outside ``[min KL, max KL]`` or for a KL ≤ 0 (no extrapolation)."""
    if level <= 0 or not curve or not curve[0][0] <= level <= curve[-1][0]:
        return None
    for (k0, g0), (k1, g1) in zip(curve, curve[1:]):
        if k0 <= level <= k1:
            if k1 == k0:
                return (g0 + g1) / 2
            if k0 <= 0:
                return None
            w = (math.log(level) - math.log(k0)) / (math.log(k1) - math.log(k0))
            return g0 + w * (g1 - g0)
    return curve[0][1]  # (a one-run curve, level == its KL)


def common_kl_range(points: Iterable[Point]) -> tuple[float, float] | None:
    """``(lo, hi)``: the KL range every (method, seed) curve covers — ``lo`` the largest of
    their smallest KLs, ``hi`` the smallest of their largest — or None when they share no
    range (then no KL level can be matched across every method)."""
    c = curves(points)
    spans = [(seeds[s][0][0], seeds[s][-1][0]) for seeds in c.values() for s in seeds]
    if not spans:
        return None
    lo, hi = max(a for a, _ in spans), min(b for _, b in spans)
    return (lo, hi) if 0 < lo < hi else None


def kl_levels(lo: float, hi: float, n: int = 3) -> list[float]:
    """``n`` KL levels spaced evenly in ``log KL`` strictly inside ``(lo, hi)``:
    ``lo·(hi/lo)^(k/(n+1))``, ``k = 1 … n``."""
    if not 0 < lo < hi:
        raise ValueError(f"kl_levels: need 0 < lo < hi, got lo={lo}, hi={hi}")
    return [lo * (hi / lo) ** (k / (n + 1)) for k in range(1, n + 1)]


def matched_kl(points: list[Point], levels: list[float], reference: str = "dvpo") -> dict:
    """Gold reward at each matched KL level per method (mean and 95 % t-interval over seeds),
    and ``reference − method`` paired by seed at each level.

    Returns ``{"levels": levels, "gold": {method: [summary | None per level]},
    "paired": {method: [paired difference | None per level]},
    "per_seed": {method: [{seed: gold} per level]}}`` (summaries as
    :func:`~dvpo_lightning.report.runs.mean_std`, differences as
    :func:`~dvpo_lightning.report.stats.paired_difference`).
    """
    c = curves(points)
    at = {m: [{s: gold_at_kl(curve, lv) for s, curve in seeds.items()} for lv in levels]
          for m, seeds in c.items()}
    at = {m: [{s: g for s, g in by_seed.items() if g is not None} for by_seed in rows]
          for m, rows in at.items()}
    gold = {m: [mean_std(list(d.values())) if d else None for d in rows]
            for m, rows in at.items()}
    paired = {}
    if reference in at:
        for m, rows in at.items():
            if m != reference:
                paired[m] = [paired_difference(ref, d) if ref and d else None
                             for ref, d in zip(at[reference], rows)]
    return {"levels": levels, "gold": gold, "paired": paired, "per_seed": at}


def matched_kl_table(result: dict, reference: str = "dvpo") -> dict:
    """:func:`matched_kl` as a report table (``tables.to_markdown``): one row per method, a
    gold column, a paired-difference column and its Holm-adjusted p (filled in by
    ``tables.adjust_p_values`` with the report's whole family) per KL level."""
    columns, rows = [], {}
    for i, lv in enumerate(result["levels"]):
        columns += [(f"gold_{i}", f"gold @ KL {lv:.3g}"),
                    (f"diff_{i}", f"{reference} − method @ KL {lv:.3g}"),
                    (f"diff_{i}_p_holm", "p (Holm)")]
    for m, golds in result["gold"].items():
        row = {}
        for i, g in enumerate(golds):
            row[f"gold_{i}"] = g
            diffs = result["paired"].get(m)
            row[f"diff_{i}"] = diffs[i] if diffs else None
        rows[m] = row
    return {"title": "Gold reward at matched KL to the reference", "columns": columns,
            "rows": rows, "interval": "ci95"}


def by_method_and_beta(points: Iterable[Point]) -> dict[tuple[str, float], list[Point]]:
    """``{(method, β): its points (one per seed)}``, sorted by method then β."""
    groups: dict[tuple[str, float], list[Point]] = {}
    for p in points:
        groups.setdefault((p.method, p.beta), []).append(p)
    return dict(sorted(groups.items()))


def frontier_table(points: list[Point]) -> dict:
    """Per method and β: KL and gold reward, mean and 95 % t-interval over seeds."""
    groups = by_method_and_beta(points)
    rows = {f"{m} (β {b:g})": {"kl": mean_std([p.kl for p in ps]),
                               "gold": mean_std([p.gold for p in ps])}
            for (m, b), ps in groups.items()}
    return {"title": "Gold reward against KL over the β grid", "columns":
            [("kl", "KL to ref"), ("gold", "gold reward ↑")], "rows": rows, "interval": "ci95"}


def validation_beta_table(points: list[Point]) -> dict:
    """Per method and β: gold reward and KL on the *validation* prompts (``points`` from
    :func:`points_from_runs` with ``split="validation"``), mean over seeds, each method's best
    mean gold marked ``chosen`` (the smallest β on a tie) — the rule that picks the default
    study's β, the one tuning uses for the learning rate."""
    groups = by_method_and_beta(points)
    best: dict[str, tuple[float, float]] = {}
    for (m, b), ps in groups.items():
        gold = sum(p.gold for p in ps) / len(ps)
        if m not in best or gold > best[m][1]:
            best[m] = (b, gold)
    rows = {f"{m} (β {b:g})": {"gold": mean_std([p.gold for p in ps]),
                               "kl": mean_std([p.kl for p in ps]),
                               "chosen": {"text": "chosen" if best[m][0] == b else ""}}
            for (m, b), ps in groups.items()}
    return {"title": "β on the validation prompts (the default study's choice)", "columns":
            [("gold", "validation gold ↑"), ("kl", "validation KL"), ("chosen", "")],
            "rows": rows, "interval": "ci95"}


def plot_frontier(points: list[Point], out: str | Path) -> Path:
    """Gold reward against KL (log axis), one line per method through its β grid (means over
    seeds, 95 % t-intervals as error bars on both axes), each seed's runs as faint points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dvpo_lightning.report.plots import _colors, _save

    methods = list(dict.fromkeys(p.method for p in points))
    colors = _colors(methods)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for m in methods:
        ps = [p for p in points if p.method == m]
        ax.scatter([p.kl for p in ps], [p.gold for p in ps], s=8, alpha=0.3, color=colors[m])
        betas = sorted({p.beta for p in ps})
        kl = [mean_std([p.kl for p in ps if p.beta == b]) for b in betas]
        gold = [mean_std([p.gold for p in ps if p.beta == b]) for b in betas]
        order = sorted(range(len(betas)), key=lambda i: kl[i]["mean"])
        ax.errorbar([kl[i]["mean"] for i in order], [gold[i]["mean"] for i in order],
                    xerr=[kl[i]["ci95"] or 0.0 for i in order],
                    yerr=[gold[i]["ci95"] or 0.0 for i in order],
                    marker="o", ms=4, capsize=2, label=m, color=colors[m])
    ax.set_xscale("log")
    ax.set_xlabel("KL to the reference (nats per response)")
    ax.set_ylabel("held-out gold reward")
    ax.set_title("Reward–KL frontier over β (mean, 95 % CI over seeds)")
    ax.legend(fontsize=7)
    return _save(fig, out)
