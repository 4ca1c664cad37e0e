"""Equal tuning on the validation prompts: for each method, the grid point (learning rate,
β, …) whose runs reach the best mean gold reward on the *validation* split, over the tuning
seeds. Every method gets a grid of the same size and the same rule; the test prompts are not
read (:attr:`Run.validation`, a run's ``final_eval``, is its last validation).
"""

from __future__ import annotations

from dvpo_lightning.report.runs import Run, mean_std


def validation_gold(run: Run) -> float:
    """The run's gold reward at its last validation (the validation prompts)."""
    return float(run.validation["eval/gold_reward"])


def select(runs: list[Run], variants: dict[str, dict]) -> dict[str, dict]:
    """``{method: {"name", "point", "gold": summary}}``: per method, the grid point with the
    highest mean validation gold over its seeds (the first in grid order on a tie).

    Args:
        runs: every tuning run (``run.method`` is a grid point's run name).
        variants: ``{run name: {"method": method, "point": {key: value}}}`` in grid order.
    """
    by_name: dict[str, list[float]] = {}
    for r in runs:
        by_name.setdefault(r.method, []).append(validation_gold(r))
    best: dict[str, dict] = {}
    for name, v in variants.items():
        if name not in by_name:
            continue
        gold = mean_std(by_name[name])
        chosen = best.get(v["method"])
        if chosen is None or gold["mean"] > chosen["gold"]["mean"]:
            best[v["method"]] = {"name": name, "point": dict(v["point"]), "gold": gold}
    return best


def tuning_table(runs: list[Run], variants: dict[str, dict], chosen: dict[str, dict]) -> dict:
    """Every grid point's validation gold (mean, 95 % t-interval over the tuning seeds), the
    chosen one marked, as a report table."""
    rows = {}
    for name, v in variants.items():
        golds = [validation_gold(r) for r in runs if r.method == name]
        if not golds:
            continue
        mark = "chosen" if chosen.get(v["method"], {}).get("name") == name else ""
        rows[name] = {"gold": mean_std(golds), "chosen": {"text": mark}}
    return {"title": "Tuning on the validation prompts (gold reward at the last validation)",
            "columns": [("gold", "validation gold ↑"), ("chosen", "")], "rows": rows,
            "interval": "ci95"}
