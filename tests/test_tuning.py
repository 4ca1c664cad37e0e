"""Selection on the validation split: the best mean validation gold per method, ties to the
first grid point, the test evaluation never read."""

from __future__ import annotations

from dvpo_lightning.report.runs import Run
from dvpo_lightning.report.tables import to_markdown
from dvpo_lightning.report.tuning import select, tuning_table


def run(name: str, seed: int, val: float, test: float = 0.0) -> Run:
    return Run(name, seed, f"/x/{name}/{seed}",
               {"final_eval": {"eval/gold_reward": val}, "history": [{"rl_step": 0}],
                "test_eval": {"eval/gold_reward": test}})


def test_select_takes_the_best_validation_mean_per_method_and_ignores_the_test():
    variants = {"dvpo@lr=1e-5": {"method": "dvpo", "point": {"lr": 1e-5}},
                "dvpo@lr=1e-4": {"method": "dvpo", "point": {"lr": 1e-4}},
                "ppo@lr=1e-5": {"method": "ppo", "point": {"lr": 1e-5}},
                "ppo@lr=1e-4": {"method": "ppo", "point": {"lr": 1e-4}}}
    runs = [run("dvpo@lr=1e-5", 0, 0.6, test=0.99), run("dvpo@lr=1e-5", 1, 0.6, test=0.99),
            run("dvpo@lr=1e-4", 0, 0.7), run("dvpo@lr=1e-4", 1, 0.6),
            run("ppo@lr=1e-5", 0, 0.5), run("ppo@lr=1e-4", 0, 0.5)]  # a tie: the first
    chosen = select(runs, variants)
    assert chosen["dvpo"]["name"] == "dvpo@lr=1e-4" and chosen["dvpo"]["point"] == {"lr": 1e-4}
    assert abs(chosen["dvpo"]["gold"]["mean"] - 0.65) < 1e-12
    assert chosen["ppo"]["name"] == "ppo@lr=1e-5"
    md = to_markdown(tuning_table(runs, variants, chosen), "")
    marked = [line.split("|")[1].strip() for line in md.splitlines() if "| chosen |" in line]
    assert marked == ["dvpo@lr=1e-4", "ppo@lr=1e-5"]
    assert "| dvpo@lr=1e-4 | 0.650" in md
