"""Does a method over-optimise the frozen model that scores it? Over a long run, the gold
reward against the run's own proxy — the GVM's value of the policy's held-out responses for
DVPO (``eval/gvm_value``), the reward model's score for the reward-model methods
(``eval/rm_score``) — at every validation.

Over-optimisation shows as the proxy still rising after the gold reward has peaked. Per run:
the step where gold peaks, gold there and at the end (the drop), and how far the proxy rose
from that step to the end, in units of the proxy's spread on the starting policy's samples
when the run standardised its reward (``summary["reward_scale"]["std"]``,
docs/study.md#one-reward-scale), else in the proxy's own units (then rises of different
scorers are not comparable, and the table says so).
"""

from __future__ import annotations

from dvpo_lightning.report.runs import Run, by_method, mean_std

PROXIES = ("eval/gvm_value", "eval/rm_score")


def proxy_key(run: Run) -> str | None:
    """The proxy the run's history measures (the GVM's value first), or None."""
    return next((k for k in PROXIES if any(k in h for h in run.history)), None)


def proxy_unit(run: Run) -> float | None:
    """The proxy's unit: the reward scale's standard deviation when the run had one."""
    scale = run.summary.get("reward_scale") or {}
    return scale.get("std") if scale.get("normalize", "none") != "none" else None


def over_optimisation(run: Run) -> dict | None:
    """``{"peak_step", "gold_peak", "gold_end", "drop", "proxy_rise", "standardised"}`` of one
    run (None without a proxy): ``drop = gold_peak − gold_end``; ``proxy_rise`` = proxy at the
    end − proxy at the gold peak (divided by :func:`proxy_unit` when there is one)."""
    key = proxy_key(run)
    if key is None:
        return None
    rows = [h for h in run.history if key in h and "eval/gold_reward" in h]
    if not rows:
        return None
    peak = max(range(len(rows)), key=lambda i: rows[i]["eval/gold_reward"])
    unit = proxy_unit(run)
    rise = rows[-1][key] - rows[peak][key]
    return {"peak_step": rows[peak]["rl_step"], "gold_peak": rows[peak]["eval/gold_reward"],
            "gold_end": rows[-1]["eval/gold_reward"],
            "drop": rows[peak]["eval/gold_reward"] - rows[-1]["eval/gold_reward"],
            "proxy_rise": rise / unit if unit else rise, "standardised": unit is not None}


def over_optimisation_table(runs: list[Run]) -> dict:
    """Per method, mean and 95 % t-interval over seeds of :func:`over_optimisation`."""
    rows = {}
    for method, rs in by_method(runs).items():
        stats = [s for s in (over_optimisation(r) for r in rs) if s is not None]
        if not stats:
            continue
        rows[method] = {k: mean_std([float(s[k]) for s in stats])
                        for k in ("peak_step", "gold_peak", "gold_end", "drop", "proxy_rise")}
        rows[method]["unit"] = {"text": "σ₀" if all(s["standardised"] for s in stats)
                                else "raw"}
    return {"title": "Over-optimisation over the long run: gold against the run's own proxy",
            "columns": [("peak_step", "gold peaks at step"), ("gold_peak", "gold at peak"),
                        ("gold_end", "gold at end"), ("drop", "drop ↓"),
                        ("proxy_rise", "proxy rise after the peak"), ("unit", "unit")],
            "rows": rows, "interval": "ci95"}


def plot_over_optimisation(runs: list[Run], out) -> object:
    """Two panels against policy updates: the gold reward, and the proxy minus its value at
    step 0 (in :func:`proxy_unit` where the run has one), mean over seeds per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from dvpo_lightning.report.plots import _band, _colors, _save, _stack
    from dvpo_lightning.report.runs import update_scale

    groups = by_method(runs)
    colors, scale = _colors(list(groups)), update_scale(runs)
    fig, (gold_ax, proxy_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for method, rs in groups.items():
        x = scale[method] if scale else 1
        steps, gold = _stack(rs, "eval/gold_reward")
        _band(gold_ax, steps * x, gold, method, colors[method])
        key = proxy_key(rs[0])
        if key is None:
            continue
        steps, proxy = _stack(rs, key)
        units = np.array([[proxy_unit(r) or 1.0] for r in rs])
        _band(proxy_ax, steps * x, (proxy - proxy[:, :1]) / units,
              f"{method} ({key.split('/')[1]})", colors[method])
    gold_ax.set_ylabel("held-out gold reward")
    proxy_ax.set_ylabel("own proxy − its start (σ₀ where standardised)")
    for ax in (gold_ax, proxy_ax):
        ax.set_xlabel("policy updates" if scale else "RL step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Long runs: the gold reward against what each method optimises")
    fig.tight_layout()
    return _save(fig, out)
