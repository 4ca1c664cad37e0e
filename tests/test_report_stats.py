"""The report's statistics on summaries of the shape the study writes: the SFT row one mean
per seed, every paired comparison with its p raw and Holm-adjusted over the whole report,
the evaluation's own noise (and "not available" for summaries without per-prompt values),
one interval convention. The summaries are written as the RL module writes them (no model
runs: the report reads only ``dvpo_artifact.json``); the real tiny studies of
test_pipeline_e2e / test_pipeline_seed_scope check the same report on real runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dvpo_lightning.report.build import CONVENTION, build_report
from dvpo_lightning.report.stats import holm, paired_t_p, t975
from dvpo_lightning.report.tables import format_p
from dvpo_lightning.runtime.artifacts import ARTIFACT_FILE

SEEDS = (0, 1, 2)
# final gold reward per (method, seed); the grid-style name is a label, not an identifier
GOLD = {"dvpo": (0.70, 0.80, 0.62), "ppo": (0.60, 0.64, 0.61), "dvpo@kl=0.03": (0.66, 0.71, 0.60)}
SFT_GOLD = {0: 0.50, 1: 0.52, 2: 0.53}  # the seed's SFT policy, as each of its runs measured it


def _eval(gold: float, kl: float, seed: int) -> dict:
    return {"eval/gold_reward": gold, "eval/win_rate_vs_ref": gold,
            "eval/kl_to_ref": kl, "eval/response_len": 6.0 + seed / 10}


def _summary(method: str, seed: int, items: bool) -> dict:
    i = list(GOLD).index(method)
    gold = GOLD[method][seed]
    # each run re-evaluates its seed's SFT policy; runs of one seed differ by evaluation noise
    ref = SFT_GOLD[seed] + 0.004 * (i - 1)
    history = [{"rl_step": 0, **_eval(ref, 0.0, seed)},
               {"rl_step": 2, **_eval((ref + gold) / 2, 0.3 + i, seed)},
               {"rl_step": 4, **_eval(gold, 0.5 + i + seed / 10, seed)}]
    summary = {"estimator": method, "final_eval": history[-1], "history": history,
               "rl_steps": 4, "policy_updates": 8,
               "train_curve": [{"gold": gold - 0.01 * k, "kl": 0.1 * k} for k in range(4)],
               "cost": {"step_s": 1.0 + i, "generate_s": 0.5, "score_s": 0.1, "update_s": 0.4,
                        "gen_tokens_per_step": 64.0, "peak_rss_gb": 1.0, "params_loaded_m": 1.0,
                        "params_trained_m": 0.5, "rl_steps": 4, "train_s": 4.0 + i + seed}}
    if items:  # 8 per-prompt gold rewards whose mean is the final value
        spread = [-0.3, 0.3, -0.1, 0.1, -0.2, 0.2, 0.0, 0.0]
        summary["final_eval_items"] = {"gold_reward": [gold + d for d in spread]}
    return summary


def _study(tmp_path: Path, items: bool) -> dict[str, dict[int, str]]:
    runs: dict[str, dict[int, str]] = {}
    for method in GOLD:
        for seed in SEEDS:
            d = tmp_path / "runs" / method / f"seed{seed}"
            d.mkdir(parents=True)
            (d / ARTIFACT_FILE).write_text(json.dumps({"summary": _summary(method, seed, items)}))
            runs.setdefault(method, {})[seed] = str(d)
    return runs


@pytest.fixture(scope="module", params=[True, False], ids=["items", "no_items"])
def report(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    build_report(_study(tmp, request.param), out=str(tmp / "report"), wandb=False)
    return (request.param, json.loads((tmp / "report/report.json").read_text()),
            (tmp / "report/report.md").read_text())


def test_sft_row_is_one_mean_per_seed(report):
    t = report[1]["tables"]["quality"]
    cell = t["rows"]["SFT (reference)"]["gold_reward"]
    # per seed: the mean of its 3 runs' evaluations (offsets −0.004, 0, +0.004 cancel)
    assert cell["n"] == 3 and cell["values"] == pytest.approx([SFT_GOLD[s] for s in SEEDS])
    sd = cell["std"]
    assert cell["ci95"] == pytest.approx(t975(2) * sd / math.sqrt(3))


def test_every_paired_comparison_has_raw_and_holm_p(report):
    _, rep, md = report
    rows = rep["tables"]["paired"]["rows"]
    assert set(rows) == {"ppo", "dvpo@kl=0.03"}
    diffs = [a - b for a, b in zip(GOLD["dvpo"], GOLD["ppo"])]
    cell = rows["ppo"]["gold_diff"]
    assert cell["values"] == pytest.approx(diffs)
    assert cell["p"] == pytest.approx(paired_t_p(diffs))
    # the family: gold and KL against each other method (4 comparisons), adjusted together
    family = rep["comparisons"]
    assert {(c["row"], c["column"]) for c in family} == {
        (m, k) for m in ("ppo", "dvpo@kl=0.03") for k in ("gold_diff", "kl_diff")}
    want = holm([c["p"] for c in family])
    assert [c["p_holm"] for c in family] == pytest.approx(want)
    assert cell["p_holm"] == pytest.approx(want[[c["row"] == "ppo" and c["column"] == "gold_diff"
                                                 for c in family].index(True)])
    assert cell["p_holm"] >= cell["p"]
    line = next(ln for ln in md.splitlines() if ln.startswith("| ppo |") and "/3" in ln)
    assert format_p(cell["p"]) in line and format_p(cell["p_holm"]) in line
    assert "p (Holm)" in md and "4 paired comparisons" in md


def test_evaluation_noise_when_present_and_when_not(report):
    items, rep, md = report
    rows = rep["tables"]["eval_noise"]["rows"]
    if items:
        spread = [-0.3, 0.3, -0.1, 0.1, -0.2, 0.2, 0.0, 0.0]
        se = math.sqrt(sum(d * d for d in spread) / 7) / math.sqrt(8)
        assert rows["dvpo"]["eval_se"]["values"] == pytest.approx([se] * 3)
        assert rows["dvpo"]["eval_se"]["text"] == f"{se:.4f}"
        assert rows["dvpo"]["n_items"]["text"] == "8"
    else:
        assert rows["dvpo"]["eval_se"]["text"] == "not available"
        assert "not available" in md
    sd = rows["ppo"]["seed_sd"]["text"]
    m = sum(GOLD["ppo"]) / 3
    assert float(sd) == pytest.approx(math.sqrt(sum((g - m) ** 2 for g in GOLD["ppo"]) / 2),
                                      abs=1e-4)


def test_one_interval_convention(report):
    _, rep, md = report
    assert md.count(CONVENTION) == 1 and rep["convention"] == CONVENTION
    assert all(t.get("interval") == "ci95" for t in rep["tables"].values())
    cost = rep["tables"]["cost"]["rows"]["ppo"]["train_s"]
    assert f"{cost['mean']:.3f} ± {cost['ci95']:.3f}" in md  # not ± std
    assert "± std" not in md and "sample std over seeds" not in md


def test_gvm_quality_correlation_has_a_seed_clustered_interval():
    """15 points (5 variants × 3 seeds): r with its seed-clustered bootstrap interval, the
    same on every call; each variant's paired difference carries its p for the Holm family."""
    from dvpo_lightning.report.gvm_quality import format_r, sweep_table
    from dvpo_lightning.report.stats import cluster_bootstrap_pearson

    points = [{"method": f"dvpo_v{v}", "seed": s, "acc_final": 0.5 + 0.1 * v + 0.01 * s,
               "acc_mean": 0.55 + 0.1 * v - 0.01 * s,
               "gain": 0.04 * v + (0.0, 0.05, -0.03)[s] + 0.01 * ((v + s) % 3)}
              for v in range(5) for s in SEEDS]
    sweep = {"points": points, "baseline": {0: 0.08, 1: 0.12, 2: 0.05}}
    table = sweep_table(sweep, "ppo")
    r = table["correlation"]["acc_final"]
    want = cluster_bootstrap_pearson([p["acc_final"] for p in points],
                                     [p["gain"] for p in points], [p["seed"] for p in points])
    assert r == want and r["clusters"] == 3 and r["lo"] <= r["r"] <= r["hi"]
    assert sweep_table(sweep, "ppo")["correlation"] == table["correlation"]
    assert format_r(r) in table["title"] and f"[{r['lo']:.2f}, {r['hi']:.2f}]" in table["title"]
    diff = table["rows"]["dvpo_v4"]["diff"]
    assert diff["p"] == pytest.approx(paired_t_p(diff["values"]))
    assert {"diff_p", "diff_p_holm"} <= {k for k, _ in table["columns"]}


def test_plot_bands_are_the_t_interval():
    """A learning-curve band spans mean ± t_{0.975, n−1} · sd / √n, not ± sd."""
    import matplotlib.pyplot as plt
    import numpy as np

    from dvpo_lightning.report.plots import _band

    values = np.array([[0.1, 0.5], [0.3, 0.6], [0.8, 0.4]])  # 3 seeds × 2 steps
    fig, ax = plt.subplots()
    _band(ax, np.array([1, 2]), values, "m", "black")
    ys = ax.collections[0].get_paths()[0].vertices[:, 1]
    plt.close(fig)
    half = t975(2) * values.std(0, ddof=1) / math.sqrt(3)
    assert ys.max() == pytest.approx(max(values.mean(0) + half))
    assert ys.min() == pytest.approx(min(values.mean(0) - half))
