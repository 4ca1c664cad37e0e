"""The sweep's results: a table (markdown + JSON) and the reward–KL plot across trials.

Each trial's numbers come from its ``summary.json`` (``final_eval``: the last held-out
evaluation, written by ``DVPOModule``), so the table shows what the trial measured, not what
W&B received.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

GOLD, KL, WIN = "eval/gold_reward", "eval/kl_to_ref", "eval/win_rate_vs_ref"


def trial_results(trial_dir: Path, metric: str, summary_file: str = "summary.json") -> dict:
    """``{gold_reward, kl_to_ref, win_rate_vs_ref, reference_gold_reward, metric}`` of one
    finished trial (None where not logged)."""
    path = Path(trial_dir) / summary_file
    if not path.is_file():
        return {"metric": None, "error": f"no {summary_file} in {trial_dir}"}
    summary = json.loads(path.read_text())
    final = summary.get("final_eval") or {}
    ref = summary.get("reference_eval") or {}
    return {"gold_reward": final.get(GOLD), "kl_to_ref": final.get(KL),
            "win_rate_vs_ref": final.get(WIN), "reference_gold_reward": ref.get("gold_reward"),
            "metric": final.get(metric)}


def best_trial(rows: list[dict], goal: str) -> dict | None:
    """The finished row with the best finite ``metric`` for ``goal`` (None if none has one)."""
    scored = [r for r in rows if r["status"] == "finished" and _finite(r.get("metric"))]
    if not scored:
        return None
    pick = max if goal == "maximize" else min
    return pick(scored, key=lambda r: r["metric"])


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return "—" if x is None else str(x)


def write_table(rows: list[dict], params: list[str], metric: str, goal: str,
                out: Path) -> tuple[Path, Path]:
    """``results.md`` and ``results.json`` in ``out``; one row per trial, failed ones too."""
    best = best_trial(rows, goal)
    cols = ["trial", "status", *params, "gold_reward", "kl_to_ref", "win_rate_vs_ref",
            f"metric ({metric}, {goal})"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        mark = " **(best)**" if best is not None and r["trial"] == best["trial"] else ""
        cells = [r["trial"] + mark, r["status"], *(_fmt(r["params"].get(p)) for p in params),
                 _fmt(r.get("gold_reward")), _fmt(r.get("kl_to_ref")),
                 _fmt(r.get("win_rate_vs_ref")), _fmt(r.get("metric"))]
        lines.append("| " + " | ".join(cells) + " |")
    if best is not None:
        chosen = ", ".join(f"{p}={best['params'][p]}" for p in params)
        lines += ["", f"Best trial by {metric} ({goal}): {best['trial']} ({chosen})."]
    md, js = out / "results.md", out / "results.json"
    md.write_text("\n".join(lines) + "\n")
    js.write_text(json.dumps({"metric": metric, "goal": goal,
                              "best": best["trial"] if best else None, "trials": rows},
                             indent=2))
    return md, js


def plot_frontier(rows: list[dict], params: list[str], metric: str, goal: str,
                  path: Path) -> Path | None:
    """Scatter of held-out gold reward against KL to the reference, one point per finished
    trial, labelled with its parameters; the upper-left frontier (most reward for at most that
    KL) joined by a line, the best trial by the sweep's metric starred. None if no trial has
    both numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r["status"] == "finished"
           and _finite(r.get("gold_reward")) and _finite(r.get("kl_to_ref"))]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter([r["kl_to_ref"] for r in pts], [r["gold_reward"] for r in pts], color="C0",
               zorder=3)
    for r in pts:
        label = ", ".join(f"{p.rsplit('.', 1)[-1]}={_fmt(r['params'].get(p))}" for p in params)
        ax.annotate(label, (r["kl_to_ref"], r["gold_reward"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)
    frontier, top = [], -math.inf
    for r in sorted(pts, key=lambda r: (r["kl_to_ref"], -r["gold_reward"])):
        if r["gold_reward"] > top:
            frontier.append(r)
            top = r["gold_reward"]
    ax.plot([r["kl_to_ref"] for r in frontier], [r["gold_reward"] for r in frontier],
            color="C0", alpha=0.5, label="frontier")
    refs = [r["reference_gold_reward"] for r in pts if _finite(r.get("reference_gold_reward"))]
    if refs:
        ax.axhline(sum(refs) / len(refs), color="grey", ls="--", label="reference (KL 0)")
    best = best_trial(rows, goal)
    if best is not None and best in pts:
        ax.scatter([best["kl_to_ref"]], [best["gold_reward"]], marker="*", s=250, color="C3",
                   zorder=4, label=f"best by {metric} ({goal}): {best['trial']}")
    ax.ticklabel_format(useOffset=False)
    ax.set_xlabel("KL to reference (nats / sequence)")
    ax.set_ylabel("held-out gold reward")
    ax.set_title("reward–KL across trials")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
