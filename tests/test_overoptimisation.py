"""Over-optimisation of a run's own proxy: by hand on made-up histories."""

from __future__ import annotations

import pytest

from dvpo_lightning.report.overoptimisation import (
    over_optimisation,
    over_optimisation_table,
    plot_over_optimisation,
)
from dvpo_lightning.report.runs import Run
from dvpo_lightning.report.tables import to_markdown


def run(method: str, seed: int, gold: list[float], proxy: list[float], key: str,
        std: float | None = None) -> Run:
    history = [{"rl_step": 10 * i, "eval/gold_reward": g, key: p}
               for i, (g, p) in enumerate(zip(gold, proxy))]
    summary = {"history": history, "final_eval": history[-1], "rl_steps": 30,
               "policy_updates": 120}
    if std is not None:
        summary["reward_scale"] = {"normalize": "first_rollout", "mean": 0.0, "std": std}
    return Run(method, seed, "/x", summary)


def test_the_proxy_rising_after_gold_peaked_by_hand():
    r = run("ppo", 0, [0.5, 0.7, 0.6, 0.55], [0.0, 1.0, 2.0, 3.0], "eval/rm_score", std=2.0)
    s = over_optimisation(r)
    assert s["peak_step"] == 10 and s["gold_peak"] == 0.7 and s["gold_end"] == 0.55
    assert s["drop"] == pytest.approx(0.15)
    assert s["proxy_rise"] == pytest.approx((3.0 - 1.0) / 2.0) and s["standardised"]
    raw = over_optimisation(run("dvpo", 0, [0.5, 0.6], [0.1, 0.2], "eval/gvm_value"))
    assert raw["drop"] == 0 and raw["proxy_rise"] == 0  # gold peaks at the end: nothing after
    assert not raw["standardised"]
    assert over_optimisation(Run("dpo", 0, "/x", {"history": [{"rl_step": 0}]})) is None


def test_table_and_plot(tmp_path):
    runs = [run("ppo", s, [0.5, 0.7, 0.6], [0.0, 1.0, 2.0 + s], "eval/rm_score", 1.0)
            for s in range(3)]
    runs += [run("dvpo", s, [0.5, 0.6, 0.7], [0.0, 0.1, 0.2], "eval/gvm_value", 0.5)
             for s in range(3)]
    table = over_optimisation_table(runs)
    assert table["rows"]["ppo"]["proxy_rise"]["mean"] == pytest.approx(2.0)
    assert table["rows"]["dvpo"]["drop"]["mean"] == pytest.approx(0.0)
    assert "σ₀" in to_markdown(table, "")
    out = plot_over_optimisation(runs, tmp_path / "long.png")
    assert out.exists() and out.stat().st_size > 1000
