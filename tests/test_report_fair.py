"""The fair study's report sections on summaries of the shape the RL module writes (no model
runs): the β frontier and matched-KL table read the *test* evaluation, the information 2 × 2
recovers effects built into the data exactly, the tuning table marks the validation choice,
and the long runs get their over-optimisation table — every p joining the report's Holm
family."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dvpo_lightning.report.build import build_report
from dvpo_lightning.runtime.artifacts import ARTIFACT_FILE

SEEDS = (0, 1, 2)
BETAS = (0.02, 0.05, 0.15, 0.5)
# method → (gold offset at equal KL, KL scale): V_s .10, V_p .06, R_s .04, R_p 0 gives a value
# effect of .06, a scores effect of .04 and no interaction, at any matched KL
METHODS = {"dvpo": (0.10, 0.5), "dvpo_gvm_pairs": (0.06, 0.7), "ppo": (0.0, 1.0),
           "ppo_rm_scores": (0.04, 0.8)}
CELLS = {"value_scores": "dvpo", "value_pairs": "dvpo_gvm_pairs",
         "reward_scores": "ppo_rm_scores", "reward_pairs": "ppo"}


def evaluation(gold: float, kl: float) -> dict:
    return {"eval/gold_reward": gold, "eval/win_rate_vs_ref": 0.5, "eval/kl_to_ref": kl,
            "eval/response_len": 6.0}


def summary(gold: float, kl: float, beta: float, history: list[dict] | None = None) -> dict:
    # the last validation (on the validation prompts) is deliberately off by −0.2: the
    # frontier must read the test evaluation
    final = {"rl_step": 60, **evaluation(gold - 0.2, kl)}
    return {"final_eval": final, "test_eval": {"rl_step": 60, **evaluation(gold, kl)},
            "history": history or [{"rl_step": 0, **evaluation(0.5, 0.0)}, final],
            "kl_coef": beta, "rl_steps": 60, "policy_updates": 240,
            "train_curve": [{"gold": gold, "kl": kl}],
            "cost": {"step_s": 1.0, "generate_s": 0.5, "score_s": 0.1, "update_s": 0.4,
                     "gen_tokens_per_step": 64.0, "peak_rss_gb": 1.0, "params_loaded_m": 1.0,
                     "params_trained_m": 0.5, "rl_steps": 60, "train_s": 60.0}}


def write(root: Path, name: str, seed: int, doc: dict) -> str:
    d = root / name / f"seed{seed}"
    d.mkdir(parents=True)
    (d / ARTIFACT_FILE).write_text(json.dumps({"summary": doc}))
    return str(d)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("fair")
    runs, variants = {}, {}
    for method, (offset, scale) in METHODS.items():
        for beta in BETAS:
            name = f"{method}@kl={beta}"
            variants[name] = {"method": method, "point": {"kl": beta}}
            for s in SEEDS:
                kl = scale * (1 + 0.1 * s) / beta ** 0.8
                gold = 0.5 + 0.05 * math.log(kl) + offset + 0.01 * s
                runs.setdefault(name, {})[s] = write(root, name, s, summary(gold, kl, beta))
    for s in SEEDS:  # a long run whose proxy keeps rising after gold peaked
        history = [{"rl_step": 10 * k, **evaluation(g, 0.1 * k), "eval/gvm_value": 0.1 * k}
                   for k, g in enumerate([0.5, 0.6, 0.7, 0.65, 0.6])]
        doc = summary(0.6, 0.4, 0.05, history)
        doc["reward_scale"] = {"normalize": "first_rollout", "mean": 0.5, "std": 0.2}
        runs.setdefault("dvpo_long", {})[s] = write(root, "dvpo_long", s, doc)
    tuning_runs, points = {}, {}
    for lr, val in ((1e-4, 0.6), (3e-4, 0.7)):
        name = f"dvpo@lr={lr}"
        points[name] = {"method": "dvpo", "point": {"lr": lr}}
        tuning_runs[name] = {s: write(root, name, s, summary(val + 0.2, 1.0, 0.05))
                             for s in (0, 1)}
    chosen = {"dvpo": {"name": "dvpo@lr=0.0003", "point": {"lr": 3e-4}}}
    out = root / "report"
    build_report(runs, out=str(out), wandb=False, examples=0, compare=None, baseline=None,
                 fair={"reference": "dvpo", "cells": CELLS, "long": ["dvpo_long"],
                       "against": {"dvpo_gvm_pairs": "dvpo", "ppo_rm_scores": "ppo",
                                   "absent": "dvpo"}},
                 variants=variants, tuning_runs=tuning_runs,
                 tuning_choice={"points": points, "chosen": chosen})
    return out, json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


def test_matched_kl_reads_the_test_evaluation_and_pairs_by_seed(report):
    _, doc, md = report
    table = doc["tables"]["matched_kl"]
    assert [k for k, _ in table["columns"]][:3] == ["gold_0", "diff_0", "diff_0_p_holm"]
    # dvpo − ppo at equal KL is exactly the offset .10 on every seed (linear in log KL)
    for i in range(3):
        diff = table["rows"]["ppo"][f"diff_{i}"]
        assert diff["mean"] == pytest.approx(0.10) and diff["wins"] == 3
        assert "p_holm" in diff
    assert doc["tables"]["frontier"]["rows"]["dvpo (β 0.05)"]["kl"]["n"] == 3
    assert "Gold reward at matched KL" in md and "p (Holm)" in md


def test_each_method_against_its_counterpart_at_matched_kl(report):
    """``fair.against``: method − counterpart at matched KL is the built-in offset difference,
    every seed (dvpo_gvm_pairs .06 − dvpo .10; ppo_rm_scores .04 − ppo 0); a method without
    runs has no row."""
    _, doc, md = report
    rows = doc["tables"]["matched_kl_against"]["rows"]
    assert list(rows) == ["dvpo_gvm_pairs", "ppo_rm_scores"]
    for method, against, want in (("dvpo_gvm_pairs", "dvpo", -0.04),
                                  ("ppo_rm_scores", "ppo", 0.04)):
        assert rows[method]["against"]["text"] == against
        for i in range(3):
            diff = rows[method][f"diff_{i}"]
            assert diff["mean"] == pytest.approx(want) and diff["n"] == 3
            assert "p_holm" in diff  # (joins the report's Holm family)
    assert "each method against its counterpart" in md


def test_beta_is_chosen_on_validation_not_test(report):
    """Validation gold is test gold − 0.2 here, the same order over β: each method's best β on
    validation is marked, with validation numbers in the table."""
    rows = report[1]["tables"]["validation_beta"]["rows"]
    for method, (offset, scale) in METHODS.items():
        golds = {b: rows[f"{method} (β {b:g})"]["gold"]["mean"] for b in BETAS}
        chosen = [b for b in BETAS if rows[f"{method} (β {b:g})"]["chosen"]["text"]]
        assert chosen == [max(golds, key=golds.get)]
        kl = scale / 0.02 ** 0.8 * (1 + 0.1 * sum(SEEDS) / len(SEEDS))
        gold = 0.5 + 0.05 * math.log(kl) + offset + 0.01 * sum(SEEDS) / len(SEEDS) - 0.2
        assert golds[0.02] == pytest.approx(gold, abs=1e-3)


def test_two_by_two_recovers_the_built_in_effects(report):
    rows = report[1]["tables"]["two_by_two"]["rows"]
    value, scores, interaction = rows.values()
    assert value["effect"]["mean"] == pytest.approx(0.06)
    assert scores["effect"]["mean"] == pytest.approx(0.04)
    assert interaction["effect"]["mean"] == pytest.approx(0.0, abs=1e-12)
    assert value["ahead"]["text"] == "3/3"


def test_tuning_and_long_runs(report):
    out, doc, md = report
    tuning = doc["tables"]["tuning"]["rows"]
    assert tuning["dvpo@lr=0.0003"]["chosen"]["text"] == "chosen"
    assert tuning["dvpo@lr=0.0001"]["chosen"]["text"] == ""
    long = doc["tables"]["over_optimisation"]["rows"]["dvpo_long"]
    assert long["peak_step"]["mean"] == 20 and long["drop"]["mean"] == pytest.approx(0.1)
    assert long["proxy_rise"]["mean"] == pytest.approx((0.4 - 0.2) / 0.2)
    assert (out / "frontier.png").exists() and (out / "over_optimisation.png").exists()
    assert any(c["table"] == "two_by_two" for c in doc["comparisons"])


def test_pairwise_matching_when_no_level_is_shared_by_every_method():
    from dvpo_lightning.report.fair import pairwise_matched_kl
    from dvpo_lightning.report.frontier import Point, common_kl_range

    points = []
    for s in SEEDS:  # a and b overlap dvpo, but not each other
        for beta, kl in ((0.5, 0.2), (0.05, 2.0)):
            points.append(Point("dvpo", beta, s, kl, 0.6 + 0.05 * math.log(kl)))
        for beta, kl in ((0.5, 0.1), (0.05, 0.5)):
            points.append(Point("a", beta, s, kl, 0.5 + 0.05 * math.log(kl)))
        for beta, kl in ((0.5, 1.0), (0.05, 4.0)):
            points.append(Point("b", beta, s, kl, 0.55 + 0.05 * math.log(kl)))
    assert common_kl_range(points) is None
    table = pairwise_matched_kl(points, "dvpo")
    assert table["rows"]["a"]["diff_1"]["mean"] == pytest.approx(0.1)
    assert table["rows"]["b"]["diff_1"]["mean"] == pytest.approx(0.05)
    assert table["rows"]["a"]["levels"]["text"].count(",") == 2


def test_final_numbers_come_from_the_test_prompts_and_tuning_from_validation(tmp_path):
    """The headline table, its starting-policy row and the evaluation-noise table read the
    test evaluation when a run has one (validation is off by −0.2 and the starting policy's
    validation by −0.1 here); tuning reads validation."""
    from dvpo_lightning.report.runs import load_runs
    from dvpo_lightning.report.tuning import validation_gold

    runs = {}
    for method, gold in (("dvpo", 0.7), ("ppo", 0.6)):
        for s in SEEDS:
            doc = summary(gold + 0.01 * s, 1.0, 0.05)
            doc["reference_test_eval"] = {"gold_reward": 0.5 + 0.01 * s, "kl_to_ref": 0.0,
                                          "response_len": 6.0}
            doc["history"][0]["eval/gold_reward"] = 0.4 + 0.01 * s
            # two prompts of two answers each (test_samples 2): prompt means gold ∓ 0.1
            doc["test_eval_items"] = {"gold_reward": [[gold - 0.2, gold], [gold, gold + 0.2]]}
            doc["final_eval_items"] = {"gold_reward": [0.0, 1.0]}
            runs.setdefault(method, {})[s] = write(tmp_path, method, s, doc)
    out = tmp_path / "report"
    build_report(runs, out=str(out), wandb=False, examples=0, compare="dvpo", baseline=None)
    doc = json.loads((out / "report.json").read_text())
    quality = doc["tables"]["quality"]["rows"]
    assert quality["dvpo"]["gold_reward"]["mean"] == pytest.approx(0.71)
    assert quality["SFT (reference)"]["gold_reward"]["mean"] == pytest.approx(0.51)
    noise = doc["tables"]["eval_noise"]["rows"]["ppo"]
    assert noise["eval_se"]["values"][0] == pytest.approx(0.1)  # sd √0.02 over √2 prompts
    assert doc["tables"]["paired"]["rows"]["ppo"]["gold_diff"]["mean"] == pytest.approx(0.1)
    assert "the test prompts (data.init_args.test_path)" in (out / "report.md").read_text()
    run = load_runs({"dvpo": {0: runs["dvpo"][0]}})[0]
    assert validation_gold(run) == pytest.approx(0.5)
