"""The whole study at a tiny size, in one process: every stage, every table, plot and
picture, the tables' numbers traced back to the runs' own summaries, and reuse on a rerun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import TASK_DATA_ARGS
from wandb_offline import read_offline_run

from dvpo_lightning.__main__ import main
from dvpo_lightning.commands.pipeline import run_pipeline_file
from dvpo_lightning.report.tables import format_cell
from dvpo_lightning.runtime.artifacts import ARTIFACT_FILE

REPO = Path(__file__).resolve().parents[1]

QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false",
         "--trainer.enable_model_summary=false"]
METHODS = {"dvpo": 8, "ppo": 8, "grpo": 2, "dpo": 8}  # prompts (DPO: pairs) per batch
SEEDS = [0, 1]
PNG = b"\x89PNG\r\n\x1a\n"


def write_study(root: Path) -> Path:
    """The repository's stage configs, shrunk by command-line overrides (what a user does)."""
    data = {"out": "data/sorting", **{k: v for k, v in TASK_DATA_ARGS.items()}}
    (root / "data.yaml").write_text(yaml.safe_dump(data))
    cfg = lambda name: str(REPO / "configs" / f"{name}.yaml")  # noqa: E731
    stage1 = ["--trainer.max_epochs=1", *QUIET]
    spec = {
        "data": "data.yaml",
        "stages": [
            {"name": "sft", "config": cfg("sft"), "artifact": "runs/sorting/sft/model",
             "args": [*stage1, "--trainer.max_steps=6", "--model.init_args.backbone=test-llama",
                      "--model.init_args.optim.warmup_steps=0", "--data.init_args.batch_size=16",
                      "--trainer.val_check_interval=1.0"]},
            {"name": "reward_model", "config": cfg("reward_model"),
             "artifact": "runs/sorting/reward_model/model",
             "args": [*stage1, "--trainer.max_steps=3", "--trainer.val_check_interval=3"]},
            {"name": "gvm", "config": cfg("gvm"), "artifact": "runs/sorting/gvm/model",
             "args": [*stage1, "--trainer.max_steps=3", "--trainer.val_check_interval=3"]},
        ],
        "seeds": SEEDS,
        "runs_dir": "runs/sorting",
        # 3 RL steps, each 2 PPO epochs × 1 mini-batch; evaluate after every RL step
        "common_args": [*QUIET, "--trainer.max_steps=3", "--trainer.val_check_interval=1",
                        "--trainer.enable_checkpointing=false",
                        "--model.init_args.ppo.mini_batch_size=8",
                        "--model.init_args.rollout.max_new_tokens=8"],
        "methods": [{"name": m, "config": cfg(m), "args": [f"--data.init_args.batch_size={b}"]}
                    for m, b in METHODS.items() if m != "dpo"] + [
            # DPO takes its own overrides (common_args are the RL module's keys): 3 updates
            {"name": "dpo", "config": cfg("dpo"), "common": False,
             "args": [*QUIET, "--trainer.max_steps=3", "--trainer.val_check_interval=1",
                      "--trainer.enable_checkpointing=false",
                      "--model.init_args.rollout.max_new_tokens=8",
                      f"--data.init_args.batch_size={METHODS['dpo']}"]}],
        "report": {"out": "runs/sorting/report", "gvm": "runs/sorting/gvm/model",
                   "reward_model": "runs/sorting/reward_model/model",
                   "eval_pairs": "data/sorting/eval_pairs.jsonl",
                   "shifted_pairs": "data/sorting/eval_pairs_shifted.jsonl", "examples": 2},
    }
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    path = write_study(root)
    first = run_pipeline_file(str(path), in_process=True)
    yield root, path, first
    mp.undo()


def test_every_stage_ran_and_every_file_is_written(study):
    root, _, first = study
    expected = {"data", "sft", "reward_model", "gvm", "report",
                *(f"{m}/seed{s}" for m in METHODS for s in SEEDS)}
    assert set(first) == expected
    assert all(v["status"] == "ran" for v in first.values())
    out = root / "runs/sorting/report"
    for name in ("learning_curves.png", "train_curves.png", "reward_vs_kl.png",
                 "token_values.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG and len(data) > 5000, name
    html = (out / "token_values.html").read_text()
    assert html.lower().startswith("<!doctype html") and "<span" in html
    for name in ("report.md", "report.json", "token_values.csv", "token_values.json"):
        assert (out / name).stat().st_size > 0, name
    for m in METHODS:
        for s in SEEDS:
            assert (root / f"runs/sorting/{m}/seed{s}/model/model.safetensors").exists()
    assert (root / "runs/sorting/ppo/seed0/model/critic/value_head.safetensors").exists()


def summaries(root: Path) -> dict:
    return {(m, s): json.loads((root / f"runs/sorting/{m}/seed{s}/model" / ARTIFACT_FILE)
                               .read_text())["summary"] for m in METHODS for s in SEEDS}


def test_table_numbers_are_the_runs_numbers(study):
    root = study[0]
    report = json.loads((root / "runs/sorting/report/report.json").read_text())
    md = (root / "runs/sorting/report/report.md").read_text()
    runs = summaries(root)
    t = report["tables"]
    for m in METHODS:
        per_seed = [runs[(m, s)] for s in SEEDS]
        # the shipped configs validate on val_prompts and test once on eval_prompts: the
        # table's final numbers are the test evaluation's
        assert all(r.get("test_eval") for r in per_seed), m
        for key, name in (("gold_reward", "eval/gold_reward"),
                          ("win_rate_vs_sft", "eval/win_rate_vs_ref"),
                          ("kl_to_ref", "eval/kl_to_ref")):
            cell = t["quality"]["rows"][m][key]
            assert cell["values"] == [r["test_eval"][name] for r in per_seed], (m, key)
            assert format_cell(cell, interval="ci95") in md
        cost = t["cost"]["rows"][m]
        assert cost["step_s"]["values"] == [r["cost"]["step_s"] for r in per_seed]
        assert cost["train_s"]["values"] == [r["cost"]["train_s"] for r in per_seed]
        if m == "dpo":  # generates nothing while training: the rollout columns say so
            assert cost["generate_s"] is None and cost["gen_tokens_per_step"] is None
        else:
            assert cost["gen_tokens_per_step"]["values"] == [r["cost"]["gen_tokens_per_step"]
                                                             for r in per_seed]
        assert all(r["rl_steps"] == 3 for r in per_seed)
        hist = [[h["eval/gold_reward"] for h in r["history"]] for r in per_seed]
        assert t["convergence"]["rows"][m]["best_gold"]["values"] == [max(h) for h in hist]
        assert all(len(h) == 4 for h in hist)  # step 0 (the SFT policy) + 3 evaluations
        # counted in policy updates: an RL step here is 2 PPO epochs × 1 mini-batch, a DPO
        # step one update
        updates = 3 * (1 if m == "dpo" else 2)
        assert all(r["policy_updates"] == updates for r in per_seed), m
        assert t["convergence"]["rows"][m]["rl_steps"]["mean"] == updates
    assert t["cost"]["rows"]["ppo"]["time_ratio"]["mean"] == pytest.approx(1.0)
    # PPO loads and trains a critic besides the policy; DVPO trains only the policy
    assert (t["cost"]["rows"]["ppo"]["params_trained_m"]["mean"]
            > 1.9 * t["cost"]["rows"]["dvpo"]["params_trained_m"]["mean"])
    vm = t["value_models"]["rows"]
    assert set(vm) == {"GVM", "ScalarRM", "critic of ppo (A/C)"}
    assert vm["critic of ppo (A/C)"]["final"]["n"] == len(SEEDS)
    # the same value models on the shifted pairs, by the same function
    assert all({"shift_final", "shift_mean"} <= set(row) for row in vm.values())
    shifted = report["value_model_accuracy"]["shifted"]["GVM"][0]
    assert vm["GVM"]["shift_final"]["mean"] == shifted["accuracy"]["final"]
    # the report records what its numbers depend on besides code and seed
    env = report["environment"]
    assert env["torch"]["cpu_capability"] and env["packages"]["torch"]
    assert "## Environment" in md and env["packages_digest"] in md
    assert shifted["pairs"] == len((root / "data/sorting/eval_pairs_shifted.jsonl")
                                   .read_text().splitlines())
    gvm_art = json.loads((root / "runs/sorting/gvm/model" / ARTIFACT_FILE).read_text())
    # the report re-evaluates the GVM on the same held-out pairs as its own validation did
    assert vm["GVM"]["final"]["mean"] == pytest.approx(gvm_art["pair_accuracy"]["final"])


def test_report_is_logged_to_wandb(study):
    root = study[0]
    (run_dir,) = (root / "runs/sorting/report/wandb").glob("offline-run-*")
    run = read_offline_run(run_dir)
    types = {k.rsplit("/", 1)[0]: v for row in run["history"] for k, v in row.items()
             if k.endswith("/_type")}
    for name in ("learning_curves", "train_curves", "reward_vs_kl", "token_values"):
        assert types[f"report/{name}"] == "image-file", name
    assert types["report/token_values_html"] == "html-file"
    for name in ("quality", "value_models", "cost", "convergence"):
        assert types[f"report/table_{name}"] == "table-file", name


def test_second_run_through_the_cli_reuses_every_stage(study, capsys):
    """``pipeline --config FILE`` (the file's keys are the pipeline's arguments) reruns
    nothing whose config and inputs did not change."""
    _, path, first = study
    main(["pipeline", "--config", str(path), "--in_process", "true", "--skip_report", "true"])
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    for name in first:
        if name != "report":
            assert f"{name} reused" in summary, summary
    assert "ran" not in summary
