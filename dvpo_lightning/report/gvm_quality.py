"""How good must a frozen GVM be? DVPO's gain against its GVM's held-out pair accuracy.

A GVM-quality sweep trains GVMs of different quality (less training data, another backbone)
at every stage-1 draw and runs DVPO on each; each (GVM, seed) is one point: x the GVM's
pair accuracy on the held-out pairs, y DVPO's held-out gold gain over the starting policy. The
baseline method's gain at the same seeds (PPO: its critic learns online from the reward
model, no GVM) is the bar a frozen value model has to clear (the paper's Table 8, turned
into the question where a frozen value model stops being enough).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dvpo_lightning.report.runs import Run, by_method, mean_std  # noqa: E402
from dvpo_lightning.report.stats import (  # noqa: E402
    cluster_bootstrap_pearson,
    paired_difference,
)
from dvpo_lightning.report.value_accuracy import pair_accuracy  # noqa: E402

RESAMPLES = 2000  # bootstrap resamples of the correlation's interval
RNG_SEED = 0  # the bootstrap's random.Random seed: the same runs give the same interval

NOTE = ("One row per DVPO variant: its GVM's held-out pair accuracy and DVPO's held-out gold "
        "gain over the starting policy (final − start, on the same prompts), mean ± 95 % CI "
        "over seeds; {baseline}'s gain at the same seeds beside it, and the paired difference "
        "with its paired-t p, raw and Holm-adjusted over every comparison in this report. r: "
        "Pearson's correlation of gain and accuracy over every (variant, seed) point, with a 95"
        " % percentile interval from a seed-clustered bootstrap (the points of one seed share "
        "its stage-1 draw, so seeds are resampled with replacement and each keeps all its "
        f"points; {RESAMPLES} resamples, fixed RNG seed). With few seeds that interval is "
        "coarse: 3 seeds allow only 10 distinct resamples.")


def _gain(run: Run) -> float:
    return run.final["eval/gold_reward"] - run.reference["eval/gold_reward"]


def sweep_points(runs: list[Run], sweep: dict[str, dict], eval_pairs: str,
                 baseline: str | None = "ppo") -> dict:
    """Every (variant, seed) point of a GVM-quality sweep.

    Args:
        runs: the study's runs.
        sweep: ``{method: {seed: GVM artifact}}`` (``{None: artifact}``: one GVM for every
            seed), one entry per DVPO variant.
        eval_pairs: the held-out pairs the accuracies are measured on.
        baseline: the method whose gain at the same seeds is the reference.

    Returns:
        ``{"points": [{method, seed, gvm, acc_final, acc_mean, gain}], "baseline":
        {seed: gain}}``; a seed a method has no run for is skipped.
    """
    groups = by_method(runs)
    points, cache = [], {}
    for method, gvms in sweep.items():
        for run in groups.get(method, []):
            gvm = gvms.get(run.seed, gvms.get(None))
            if gvm is None:
                continue
            if gvm not in cache:
                cache[gvm] = pair_accuracy(gvm, eval_pairs)["accuracy"]
            points.append({"method": method, "seed": run.seed, "gvm": gvm,
                           "acc_final": cache[gvm]["final"], "acc_mean": cache[gvm]["mean"],
                           "gain": _gain(run)})
    base = {r.seed: _gain(r) for r in groups.get(baseline, [])} if baseline else {}
    return {"points": points, "baseline": base}


def sweep_table(sweep: dict, baseline: str | None = "ppo") -> dict:
    """Per variant: its GVMs' accuracy, DVPO's gain, ``baseline``'s gain at the same seeds
    and the paired difference (cells as in :mod:`~dvpo_lightning.report.tables`)."""
    rows = {}
    base = sweep["baseline"]
    for method in dict.fromkeys(p["method"] for p in sweep["points"]):
        pts = [p for p in sweep["points"] if p["method"] == method]
        gains = {p["seed"]: p["gain"] for p in pts}
        shared = [s for s in gains if s in base]
        rows[method] = {
            "acc_final": mean_std([p["acc_final"] for p in pts]),
            "acc_mean": mean_std([p["acc_mean"] for p in pts]),
            "gain": mean_std(list(gains.values())),
            "baseline_gain": mean_std([base[s] for s in shared]) if shared else None,
            "diff": paired_difference(gains, base)}
    pts = sweep["points"]
    r = {k: cluster_bootstrap_pearson([p[k] for p in pts], [p["gain"] for p in pts],
                                      [p["seed"] for p in pts], RESAMPLES, RNG_SEED)
         for k in ("acc_final", "acc_mean")}
    title = ("GVM quality against DVPO's gain (Table 8 analog); r(gain, accuracy) [95 % "
             "seed-clustered bootstrap interval]: "
             + ", ".join(f"{k.removeprefix('acc_')} {format_r(v)}" for k, v in r.items()))
    columns = [("acc_final", "GVM acc. (final) ↑"), ("acc_mean", "GVM acc. (token mean) ↑"),
               ("gain", "DVPO gain ↑")]
    if base:
        columns += [("baseline_gain", f"{baseline} gain, same seeds"),
                    ("diff", f"DVPO − {baseline}"), ("diff_p", "p"),
                    ("diff_p_holm", "p (Holm)")]
    return {"title": title, "columns": columns, "rows": rows, "interval": "ci95",
            "correlation": r}


def format_r(r: dict) -> str:
    """``0.91 [0.62, 0.99]``: a :func:`~dvpo_lightning.report.stats.cluster_bootstrap_pearson`
    result as text (``—`` when r is undefined, no brackets without an interval)."""
    if r["r"] is None:
        return "—"
    if r["lo"] is None:
        return f"{r['r']:.2f} [no interval: {r['clusters']} seed(s)]"
    return f"{r['r']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}]"


def plot_sweep(sweep: dict, out: str | Path, baseline: str | None = "ppo") -> Path:
    """Two panels (final-value and token-mean accuracy on x), DVPO's gain on y, one colour
    per variant, one point per seed; ``baseline``'s mean gain as a line with its 95 % band."""
    methods = list(dict.fromkeys(p["method"] for p in sweep["points"]))
    cmap = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    base = list(sweep["baseline"].values())
    for ax, key, label in zip(axes, ("acc_final", "acc_mean"),
                              ("final value", "token mean")):
        for i, m in enumerate(methods):
            pts = [p for p in sweep["points"] if p["method"] == m]
            ax.scatter([p[key] for p in pts], [p["gain"] for p in pts], color=cmap(i % 10),
                       label=m, s=30)
        if base:
            b = mean_std(base)
            ax.axhline(b["mean"], color="black", lw=1, label=f"{baseline} (mean, 95 % CI)")
            if b["ci95"] is not None:
                ax.axhspan(b["mean"] - b["ci95"], b["mean"] + b["ci95"], color="black",
                           alpha=0.1)
        ax.axhline(0, color="grey", lw=0.5, ls=":")
        ax.set_xlabel(f"GVM held-out pair accuracy ({label})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out gold gain over the start")
    axes[0].legend(fontsize=8)
    fig.suptitle("How good must a frozen GVM be? DVPO's gain against its GVM's accuracy")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)
