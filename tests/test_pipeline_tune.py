"""Equal tuning for real, tiny: DVPO's learning rate chosen on the validation prompts from a
two-point ``tune`` grid, then the study's β grid run with the chosen point — and the checks on
a ``tune`` that cannot work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dvpo_lightning.__main__ import main
from dvpo_lightning.commands.pipeline import run_pipeline_file
from dvpo_lightning.commands.pipeline_spec import PipelineSpecError, parse_spec
from dvpo_lightning.runtime.artifacts import ARTIFACT_FILE
from tests.test_pipeline_grid_run import REPO, spec

LRS = [1e-6, 3e-3]
TUNE = ["dvpo@lr=1e-6", "dvpo@lr=0.003"]


def tuned(task_data, artifacts) -> dict:
    doc = spec(task_data, artifacts, [0.01, 0.3])
    doc["methods"][0]["tune"] = {"lr": {"arg": "model.init_args.optim.lr", "values": LRS}}
    # a longer run of the same method takes DVPO's choice instead of tuning its own
    doc["methods"].append({"name": "dvpo_long", "config": doc["methods"][0]["config"],
                           "common": False, "tune_from": "dvpo",
                           "args": [*doc["common_args"], "--trainer.max_steps=2"]})
    doc["report"]["out"] = "runs/g/report"
    return doc


@pytest.fixture(scope="module")
def tuned_study(task_data, artifacts, tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    path = root / "tune.yaml"
    path.write_text(yaml.safe_dump(tuned(task_data, artifacts)))
    main(["pipeline", "--config", str(path), "--dry_run", "true"])  # before anything exists
    done = run_pipeline_file(str(path), in_process=True)
    yield root, path, done
    mp.undo()


def validation_gold(root: Path, name: str) -> float:
    meta = json.loads((root / "runs/g" / name / "seed0/model" / ARTIFACT_FILE).read_text())
    return meta["summary"]["final_eval"]["eval/gold_reward"]


def test_tuning_runs_first_and_the_main_runs_take_the_validation_best(tuned_study, capsys):
    root, path, done = tuned_study
    assert [k for k in done if k.startswith("dvpo@lr")] == [f"{n}/seed0" for n in TUNE]
    gold = {n: validation_gold(root, n) for n in TUNE}
    best = max(TUNE, key=lambda n: (gold[n], -TUNE.index(n)))  # (a tie: the first)
    lr = LRS[TUNE.index(best)]
    choice = json.loads((root / "runs/g/tuning.json").read_text())
    assert choice["chosen"]["dvpo"]["name"] == best and choice["seeds"] == [0]
    for name in ("dvpo@kl=0.01", "dvpo@kl=0.3"):
        stamp = json.loads((root / "runs/g" / name / "seed0/model/pipeline_stage.json")
                           .read_text())
        assert stamp["args"][-1] == f"--model.init_args.optim.lr={lr}"
        assert stamp["args"][-2].startswith("--model.init_args.kl.coef=")
    long = json.loads((root / "runs/g/dvpo_long/seed0/model/pipeline_stage.json").read_text())
    assert long["args"][-1] == f"--model.init_args.optim.lr={lr}" and "dvpo_long@" not in str(done)
    report = json.loads((root / "runs/g/report/report.json").read_text())
    assert report["tuning"]["chosen"]["dvpo"]["name"] == best
    assert set(report["tuning"]["points"]) == set(TUNE)
    assert not set(TUNE) & set(report["tables"]["quality"]["rows"])  # tuning runs: not results

    capsys.readouterr()
    main(["pipeline", "--config", str(path), "--dry_run", "true"])  # now: the choice is known
    out = capsys.readouterr().out
    assert f"with the points chosen: dvpo {best}" in out
    assert out.count(" reuse ") >= 4 and "<chosen on validation>" not in out


def test_the_dry_run_before_tuning_says_the_choice_comes_later(tuned_study, capsys):
    # (the fixture's first dry run printed before any run existed; rerun it in a fresh root)
    root, path, _ = tuned_study
    fresh = root / "fresh"
    fresh.mkdir()
    doc = yaml.safe_load(path.read_text())
    doc["runs_dir"] = str(fresh / "runs")
    other = fresh / "tune.yaml"
    other.write_text(yaml.safe_dump(doc))
    capsys.readouterr()
    main(["pipeline", "--config", str(other), "--dry_run", "true"])
    out = capsys.readouterr().out
    assert "phase 1: tuning on the validation prompts, seeds [0]" in out
    assert "--model.init_args.optim.lr=<chosen on validation>" in out
    assert not (fresh / "runs").exists()


def test_tune_refuses_a_swept_key_and_foreign_tuning_seeds():
    method = {"name": "dvpo", "config": str(REPO / "configs/dvpo.yaml"),
              "grid": {"lr": {"arg": "model.init_args.optim.lr", "values": [1e-5, 1e-4]}},
              "tune": {"lr2": {"arg": "model.init_args.optim.lr", "values": [1e-5, 1e-4]}}}
    with pytest.raises(PipelineSpecError, match=r"methods\[0\].tune.lr2.arg: is also a grid"):
        parse_spec({"methods": [method]})
    del method["grid"]
    other = {"name": "ppo", "config": method["config"], "tune_from": "grpo"}
    with pytest.raises(PipelineSpecError, match=r"methods\[1\].tune_from: must name a method "
                       r"with tune axes, got 'grpo'. methods with tune axes: \['dvpo'\]"):
        parse_spec({"methods": [method, other]})
    with pytest.raises(PipelineSpecError, match="tuning_seeds: must be among seeds"):
        parse_spec({"methods": [method], "seeds": [0, 1], "tuning_seeds": [2]})
