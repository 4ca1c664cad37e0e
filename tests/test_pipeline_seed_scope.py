"""Whole-pipeline seeds (``seed_scope: pipeline``) at a tiny size, in one process: stage 1 is
retrained per seed and each seed's methods read that seed's artifacts; the report's
intervals, paired differences, per-seed value models, the PPO run whose critic starts from the
GVM, and the GVM-quality sweep are the runs' own numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_pipeline_e2e import QUIET, write_study

from dvpo_lightning.commands.pipeline import run_pipeline, run_pipeline_file
from dvpo_lightning.report.build import CACHE
from dvpo_lightning.report.stats import holm, paired_t_p, t975
from dvpo_lightning.runtime.artifacts import ARTIFACT_FILE

REPO = Path(__file__).resolve().parents[1]
SEEDS = [0, 1]
GVM_HALF = "runs/sorting/gvm_half/model"
GVM = "runs/sorting/gvm/model"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeded")
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    spec = yaml.safe_load(write_study(root).read_text())
    gvm_stage = next(s for s in spec["stages"] if s["name"] == "gvm")
    spec["stages"].append({**gvm_stage, "name": "gvm_half", "artifact": GVM_HALF,
                           "args": [*gvm_stage["args"], "--data.init_args.train_fraction=0.5"]})
    ppo = next(m for m in spec["methods"] if m["name"] == "ppo")
    dvpo = next(m for m in spec["methods"] if m["name"] == "dvpo")
    spec["methods"] = [dvpo, ppo,
                       {**ppo, "name": "ppo_gvm_critic",
                        "args": [*ppo["args"], f"--model.init_args.critic_init={GVM}"]},
                       {**dvpo, "name": "dvpo_half",
                        "args": [*dvpo["args"], f"--model.init_args.value_model={GVM_HALF}"]}]
    spec["seeds"] = SEEDS
    spec["seed_scope"] = "pipeline"
    # answers from the global RNG: with the configs' common random numbers a policy that 3 RL
    # steps barely moved answers every tiny test prompt as its reference did (gain exactly 0 at
    # every point), and the GVM-quality correlation below would have nothing to correlate
    spec["common_args"] = [*spec.get("common_args", []),
                           "--model.init_args.rollout.eval_seed=null"]
    spec["report"].update(gvm_sweep={"dvpo": GVM, "dvpo_half": GVM_HALF},
                          wandb=False)
    path = root / "seeded.yaml"
    path.write_text(yaml.safe_dump(spec))
    first = run_pipeline_file(str(path), in_process=True)
    yield root, path, first
    mp.undo()


def _artifact(root: Path, run: str) -> dict:
    return json.loads((root / run / ARTIFACT_FILE).read_text())


def test_stage_one_is_trained_per_seed(study):
    root, _, first = study
    stages = ("sft", "reward_model", "gvm", "gvm_half")
    assert {f"{s}/seed{k}" for s in stages for k in SEEDS} <= set(first)
    assert not (root / "runs/sorting/sft/model").exists()  # never the shared artifact
    for name in stages:
        weights = [load_file(str(root / f"runs/sorting/{name}/seed{k}/model/model.safetensors"))
                   for k in SEEDS]
        assert any(not weights[0][k].equal(weights[1][k]) for k in weights[0]), name


def test_each_seeds_methods_read_that_seeds_artifacts(study):
    root = study[0]
    for k in SEEDS:
        stage = f"runs/sorting/{{}}/seed{k}/model"
        dvpo = json.loads((root / f"runs/sorting/dvpo/seed{k}/model/pipeline_stage.json")
                          .read_text())["args"]
        assert f"--model.init_args.policy={stage.format('sft')}" in dvpo
        assert f"--model.init_args.value_model={stage.format('gvm')}" in dvpo
        half = json.loads((root / f"runs/sorting/dvpo_half/seed{k}/model/pipeline_stage.json")
                          .read_text())["args"]
        assert half[-1] == f"--model.init_args.value_model={stage.format('gvm_half')}"
        critic = json.loads((root / f"runs/sorting/ppo_gvm_critic/seed{k}/model/"
                             "pipeline_stage.json").read_text())["args"]
        assert critic[-1] == f"--model.init_args.critic_init={stage.format('gvm')}"
        gvm = json.loads((root / f"runs/sorting/gvm/seed{k}/model/pipeline_stage.json")
                         .read_text())["args"]
        assert f"--model.init_args.backbone={stage.format('sft')}" in gvm
        assert gvm[0] == f"--seed_everything={k}"


def test_critic_init_from_the_gvm_loads_the_gvm(study):
    """``critic_init: <GVM>``: PPO's critic starts as the GVM (backbone and head), not as the
    reward model it would start from by default."""
    from dvpo_lightning.models.loading import load_tokenizer
    from dvpo_lightning.models.options import ModelOptions
    from dvpo_lightning.models.value_model import ValueModel
    from dvpo_lightning.modules.rl_models import load_rl_models
    from dvpo_lightning.rollout.experience import Need

    root = study[0]
    art = {n: str(root / f"runs/sorting/{n}/seed0/model") for n in ("sft", "gvm", "reward_model")}
    tok = load_tokenizer(art["sft"])
    needs = frozenset({Need.CRITIC_VALUES, Need.SCORES})
    start = {}
    for init in (art["gvm"], None):
        models = load_rl_models(needs, "GAE", tok, art["sft"], None, None, art["reward_model"],
                                init, ModelOptions())
        start[init] = models.trained["critic"].state_dict()
    for name, path in (("gvm", art["gvm"]), ("reward_model", None)):
        want = ValueModel.from_pretrained(art[name], tok).state_dict()
        got = start[path]
        assert set(got) == set(want)
        assert all(got[k].equal(want[k]) for k in want), name
    assert any(not start[art["gvm"]][k].equal(start[None][k]) for k in start[None])


def test_report_intervals_and_paired_differences(study):
    root = study[0]
    report = json.loads((root / "runs/sorting/report/report.json").read_text())
    t = report["tables"]
    summaries = {(m, k): _artifact(root, f"runs/sorting/{m}/seed{k}/model")["summary"]
                 for m in ("dvpo", "ppo", "ppo_gvm_critic", "dvpo_half") for k in SEEDS}
    # the shipped configs test once on eval_prompts: the report's final numbers are those
    assert all(s.get("test_eval") for s in summaries.values())
    final = {key: s["test_eval"] for key, s in summaries.items()}
    cell = t["quality"]["rows"]["ppo"]["gold_reward"]
    vals = [final[("ppo", k)]["eval/gold_reward"] for k in SEEDS]
    assert cell["values"] == vals
    assert cell["ci95"] == pytest.approx(t975(1) * cell["std"] / 2 ** 0.5)
    diff = t["paired"]["rows"]["ppo"]["gold_diff"]
    assert diff["values"] == [final[("dvpo", k)]["eval/gold_reward"]
                              - final[("ppo", k)]["eval/gold_reward"] for k in SEEDS]
    assert t["paired"]["rows"]["ppo"]["ahead"]["text"] == f"{sum(v > 0 for v in diff['values'])}/2"
    assert set(t["paired"]["rows"]) == {"ppo", "ppo_gvm_critic", "dvpo_half"}
    assert diff["p"] == pytest.approx(paired_t_p(diff["values"]))
    # one family: every paired comparison of the report (gold and KL against 3 methods, and
    # the GVM sweep's 2 variants against PPO), Holm-adjusted together
    family = report["comparisons"]
    assert len(family) == 8 and {c["table"] for c in family} == {"paired", "gvm_quality"}
    assert [c["p_holm"] for c in family] == pytest.approx(holm([c["p"] for c in family]))
    assert diff["p_holm"] >= diff["p"]
    # the SFT row: one mean per seed over the 4 runs that evaluated that seed's SFT policy
    # on the test prompts
    ref = t["quality"]["rows"]["SFT (reference)"]["gold_reward"]
    per_seed = [[summaries[(m, k)]["reference_test_eval"]["gold_reward"]
                 for m in ("dvpo", "ppo", "ppo_gvm_critic", "dvpo_half")] for k in SEEDS]
    assert ref["values"] == pytest.approx([sum(v) / len(v) for v in per_seed])
    assert set(t["eval_noise"]["rows"]) == {"dvpo", "ppo", "ppo_gvm_critic", "dvpo_half"}
    vm = t["value_models"]["rows"]
    assert set(vm) == {"GVM", "ScalarRM", "critic of ppo (A/C)",
                       "critic of ppo_gvm_critic (A/C)"}
    assert all(row["final"]["n"] == len(SEEDS) for row in vm.values())  # one per seed
    md = (root / "runs/sorting/report/report.md").read_text()
    assert "retrained per seed" in md and "Paired differences" in md


def test_gvm_quality_sweep_points_are_the_runs(study):
    root = study[0]
    report = json.loads((root / "runs/sorting/report/report.json").read_text())
    points = report["gvm_sweep"]["points"]
    assert {(p["method"], p["seed"]) for p in points} == {
        (m, k) for m in ("dvpo", "dvpo_half") for k in SEEDS}
    for p in points:
        s = _artifact(root, f"runs/sorting/{p['method']}/seed{p['seed']}/model")["summary"]
        # the gain over the starting policy on the test prompts
        assert p["gain"] == pytest.approx(s["test_eval"]["eval/gold_reward"]
                                          - s["reference_test_eval"]["gold_reward"])
        want = "gvm_half" if p["method"] == "dvpo_half" else "gvm"
        assert p["gvm"] == f"runs/sorting/{want}/seed{p['seed']}/model"
    assert (root / "runs/sorting/report/gvm_quality.png").read_bytes()[:4] == b"\x89PNG"
    assert set(report["tables"]["gvm_quality"]["rows"]) == {"dvpo", "dvpo_half"}
    # r over the 4 points with a seed-clustered bootstrap interval (2 seeds: 3 resamples)
    r = report["tables"]["gvm_quality"]["correlation"]["acc_final"]
    assert r["clusters"] == len(SEEDS) and r["resamples"] + r["skipped"] == 2000
    assert r["r"] is None or r["lo"] is None or r["lo"] <= r["r"] <= r["hi"]


def test_a_rerun_reuses_everything_and_a_new_variant_reruns_only_itself(study):
    """Dependencies are the artifacts a stage reads: a new GVM variant does not invalidate
    the runs that never read it."""
    root, path, first = study
    spec = yaml.safe_load(path.read_text())
    gvm_stage = next(s for s in spec["stages"] if s["name"] == "gvm")
    spec["stages"].append({**gvm_stage, "name": "gvm_quarter",
                           "artifact": "runs/sorting/gvm_quarter/model",
                           "args": [*gvm_stage["args"], "--data.init_args.train_fraction=0.25",
                                    *QUIET]})
    spec["seeds"] = [0]
    path2 = root / "more.yaml"
    path2.write_text(yaml.safe_dump(spec))
    again = run_pipeline_file(str(path2), in_process=True, skip_report=True)
    ran = {k for k, v in again.items() if v["status"] == "ran"}
    assert ran == {"gvm_quarter/seed0"}, again


def test_two_workers_give_the_same_numbers(study, tmp_path, monkeypatch):
    """``workers: 2`` runs the stages in two spawned processes as soon as what they read is
    done; at the same thread count every artifact and evaluation equals the serial run's, and
    the report's value-model accuracies, measured by the workers as each model appeared
    (:mod:`~dvpo_lightning.commands.pipeline_prefetch`), equal the serial report's own."""
    root, path, _ = study
    spec = yaml.safe_load(path.read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))  # as this process
    (tmp_path / "data.yaml").write_text((root / "data.yaml").read_text())
    out = run_pipeline(**{**spec, "workers": 2, "in_process": True})
    assert all(v["status"] == "ran" for k, v in out.items() if k != "data")
    report = "runs/sorting/report/report.json"
    serial, parallel = (json.loads((r / report).read_text())["value_model_accuracy"]
                        for r in (root, tmp_path))
    assert parallel == serial
    # one measurement per value model (stage 1's GVMs and reward models, the PPO runs'
    # critics), each made by a worker: the report found them all and measured none again
    models = sum(len(v) for v in parallel["in_distribution"].values())
    assert models == 4 * len(SEEDS)  # GVM, reward model, the critics of ppo and ppo_gvm_critic
    cached = list((tmp_path / "runs/sorting/report" / CACHE).glob("*.json"))
    assert len(cached) == models
    for name in ("sft", "reward_model", "gvm", "gvm_half"):
        for k in SEEDS:
            rel = f"runs/sorting/{name}/seed{k}/model/model.safetensors"
            a, b = load_file(str(root / rel)), load_file(str(tmp_path / rel))
            assert all(a[t].equal(b[t]) for t in a), rel
    for m in ("dvpo", "ppo", "ppo_gvm_critic", "dvpo_half"):
        for k in SEEDS:
            rel = f"runs/sorting/{m}/seed{k}/model"
            assert (_artifact(tmp_path, rel)["summary"]["history"]
                    == _artifact(root, rel)["summary"]["history"]), rel
