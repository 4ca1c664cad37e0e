"""A grid for real, tiny: DVPO at two KL coefficients, one RL step each, through the pipeline
in one process. Each point is its own run under its run name (directory, W&B run, the
report's method), the report's JSON says which method and point each name is, and the
planner then sees both runs reused and estimates a new point from their recorded time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dvpo_lightning.__main__ import main
from dvpo_lightning.commands.pipeline import run_pipeline_file
from dvpo_lightning.runtime.artifacts import ARTIFACT_FILE

REPO = Path(__file__).resolve().parents[1]
NAMES = ["dvpo@kl=0.01", "dvpo@kl=0.3"]


def spec(task_data: str, artifacts, kls: list[float]) -> dict:
    data = Path(task_data)
    return {
        "seeds": [0], "runs_dir": "runs/g",
        "common_args": ["--trainer.logger=false", "--trainer.enable_progress_bar=false",
                        "--trainer.enable_model_summary=false", "--trainer.max_steps=1",
                        "--trainer.val_check_interval=1", "--trainer.enable_checkpointing=false",
                        f"--model.init_args.policy={artifacts.policy}",
                        f"--model.init_args.value_model={artifacts.gvm}",
                        "--model.init_args.ppo.mini_batch_size=8",
                        "--model.init_args.rollout.max_new_tokens=8",
                        f"--data.init_args.train_path={data / 'rl_prompts.jsonl'}",
                        f"--data.init_args.eval_path={data / 'eval_prompts.jsonl'}",
                        "--data.init_args.test_path=null",
                        f"--data.init_args.tokenizer={data / 'tokenizer'}",
                        "--data.init_args.batch_size=8"],
        "methods": [{"name": "dvpo", "config": str(REPO / "configs" / "dvpo.yaml"),
                     "grid": {"kl": {"arg": "model.init_args.kl.coef", "values": kls}}}],
        "report": {"out": "runs/g/report", "wandb": False, "examples": 0, "compare": None,
                   "baseline": None},
    }


@pytest.fixture(scope="module")
def grid_study(task_data, artifacts, tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    path = root / "grid.yaml"
    path.write_text(yaml.safe_dump(spec(task_data, artifacts, [0.01, 0.3])))
    done = run_pipeline_file(str(path), in_process=True)
    yield root, done
    mp.undo()


def test_each_point_is_its_own_run(grid_study):
    root, done = grid_study
    assert {k: v["status"] for k, v in done.items()} == {
        **{f"{n}/seed0": "ran" for n in NAMES}, "report": "ran"}
    for name in NAMES:
        run = root / "runs/g" / name / "seed0"
        kl = float(name.split("=")[1])
        assert json.loads((run / "model" / ARTIFACT_FILE).read_text())["summary"]["kl_coef"] == kl
        stamp = json.loads((run / "model" / "pipeline_stage.json").read_text())
        assert stamp["args"][-1] == f"--model.init_args.kl.coef={kl}"
        assert stamp["seconds"] > 0
    report = json.loads((root / "runs/g/report/report.json").read_text())
    assert report["variants"] == {n: {"method": "dvpo", "point": {"kl": float(n.split("=")[1])}}
                                  for n in NAMES}
    assert set(NAMES) <= set(report["tables"]["quality"]["rows"])


def test_the_plan_reuses_the_runs_and_estimates_a_new_point(grid_study, task_data, artifacts,
                                                           capsys):
    root, _ = grid_study
    path = root / "more.yaml"
    path.write_text(yaml.safe_dump(spec(task_data, artifacts, [0.01, 0.3, 0.1])))
    capsys.readouterr()
    main(["pipeline", "--config", str(path), "--dry_run", "true"])
    out = capsys.readouterr().out
    status = {ln.split()[4]: ln.split()[1] for ln in out.splitlines() if ln[:4].strip().isdigit()}
    assert status == {"dvpo@kl=0.01/seed0": "reuse", "dvpo@kl=0.3/seed0": "reuse",
                      "dvpo@kl=0.1/seed0": "run"}
    seconds = [json.loads((root / "runs/g" / n / "seed0/model/pipeline_stage.json").read_text())
               ["seconds"] for n in NAMES]
    assert (f"time to run: about {sum(seconds) / 2 / 60:.1f} min of stage time" in out), out
    assert not (root / "runs/g/dvpo@kl=0.1").exists()
