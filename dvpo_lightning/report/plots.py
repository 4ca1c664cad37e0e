"""The study's figures (matplotlib, Agg, PNG): learning curves per method (Figure 4 analog),
held-out reward against KL, and the per-step training curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dvpo_lightning.report.runs import Run, by_method, update_scale  # noqa: E402
from dvpo_lightning.report.stats import t975  # noqa: E402

EVAL_PANELS = [("eval/gold_reward", "held-out gold reward"), ("eval/kl_to_ref", "KL to reference"),
               ("eval/win_rate_vs_ref", "win rate vs SFT")]


def _stack(rs: list[Run], key: str, rows: str = "history") -> tuple[np.ndarray, np.ndarray]:
    """``(steps (S,), values (n_seeds, S))`` over the steps every seed has ``key`` at."""
    per_seed = [{h["rl_step"]: h[key] for h in r.history if key in h} if rows == "history" else
                {i + 1: row[key] for i, row in enumerate(r.summary["train_curve"]) if key in row}
                for r in rs]
    steps = sorted(set.intersection(*(set(p) for p in per_seed)))
    return np.array(steps), np.array([[p[s] for s in steps] for p in per_seed])


def _band(ax, steps, values, label, color) -> None:
    """The mean over seeds (rows of ``values``) and its 95 % Student-t band,
    ``± t_{0.975, n−1} · std / √n`` (the report's one interval convention)."""
    mean = values.mean(0)
    ax.plot(steps, mean, marker="o" if len(steps) < 30 else None, ms=3, label=label,
            color=color)
    n = values.shape[0]
    if n > 1:
        half = t975(n - 1) * values.std(0, ddof=1) / np.sqrt(n)
        ax.fill_between(steps, mean - half, mean + half, alpha=0.2, color=color)


def _colors(methods: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def eval_panels(runs: list[Run]) -> list[tuple[str, str]]:
    """The :data:`EVAL_PANELS` some run measured (a run without a judge has no gold reward
    and no win rate)."""
    return [(key, label) for key, label in EVAL_PANELS
            if any(key in h for r in runs for h in r.history)]


def plot_learning_curves(runs: list[Run], out: str | Path, reference: str = "SFT") -> Path:
    """Held-out gold reward, KL and win rate (against ``reference``, the starting policy)
    against RL steps, mean and 95 % t-interval band over seeds; a panel whose measure no run
    has is left out."""
    groups = by_method(runs)
    colors = _colors(list(groups))
    scale = update_scale(runs)  # x in policy updates, so DPO and RL runs share the axis
    panels = eval_panels(runs)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    axes = axes[0]
    for ax, (key, label) in zip(axes, panels):
        for method, rs in groups.items():
            steps, values = _stack(rs, key)
            _band(ax, steps * (scale[method] if scale else 1), values, method, colors[method])
        ax.set_xlabel("policy updates (optimizer steps)" if scale else
                      "RL step (policy updates on one rollout batch)")
        ax.set_ylabel(label.replace("SFT", reference))
        ax.grid(alpha=0.3)
    axes[0].legend()
    n = max(len(rs) for rs in groups.values())
    fig.suptitle(f"Held-out evaluation during training (mean, band: 95 % t-interval over {n} "
                 "seed(s))")
    fig.tight_layout()
    return _save(fig, out)


def run_learning_curves(summary: dict, log_dir: Path) -> dict[str, Path]:
    """One run's learning curves from its summary (for W&B): ``{"eval/learning_curves":
    png}``, or {} when the run has no held-out evaluation with a measure to draw."""
    run = Run(summary["estimator"], 0, "", summary)
    if not summary["history"] or not eval_panels([run]):
        return {}
    return {"eval/learning_curves": plot_learning_curves([run], log_dir / "learning_curves.png")}


def plot_train_curves(runs: list[Run], out: str | Path, window: int = 5) -> Path:
    """Rollout gold reward and KL at every RL step (moving average of ``window`` steps; mean
    and 95 % t-interval band over seeds)."""
    groups = by_method(runs)
    colors = _colors(list(groups))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (key, label) in zip(axes, [("gold", "rollout gold reward"),
                                       ("kl", "rollout KL to reference")]):
        for method, rs in groups.items():
            steps, values = _stack(rs, key, rows="train")
            if steps.size == 0:
                continue
            k = min(window, len(steps))
            kernel = np.ones(k) / k
            smooth = np.array([np.convolve(v, kernel, mode="valid") for v in values])
            _band(ax, steps[k - 1:], smooth, method, colors[method])
        ax.set_xlabel("RL step")
        ax.set_ylabel(f"{label} (moving average, {window} steps)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    return _save(fig, out)


def plot_reward_vs_kl(runs: list[Run], out: str | Path) -> Path:
    """Held-out gold reward against KL to the reference: each method's mean path through its
    evaluations (line) and each seed's final point (dots)."""
    groups = by_method(runs)
    colors = _colors(list(groups))
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method, rs in groups.items():
        _, kl = _stack(rs, "eval/kl_to_ref")
        _, gold = _stack(rs, "eval/gold_reward")
        ax.plot(kl.mean(0), gold.mean(0), color=colors[method], alpha=0.6, label=method)
        ax.scatter([r.final["eval/kl_to_ref"] for r in rs],
                   [r.final["eval/gold_reward"] for r in rs], color=colors[method], s=25)
    ax.set_xlabel("KL to reference (nats per response)")
    ax.set_ylabel("held-out gold reward")
    ax.set_title("Held-out reward against KL\n(line: mean path over training; dots: each "
                 "seed's end)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, out)


def _save(fig, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
