"""The pipeline's typed specification, grids and planner, with no training: every mistake is
one error naming the file and key path before anything runs; grid points expand in a fixed
order into stable run names; ``--dry_run true`` lists every job and writes nothing; every
shipped pipeline file parses and plans."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

from dvpo_lightning.__main__ import main
from dvpo_lightning.commands.errors import DEBUG_ENV
from dvpo_lightning.commands.pipeline import build_jobs, load_file, plan_jobs
from dvpo_lightning.commands.pipeline_grid import expand, spell
from dvpo_lightning.commands.pipeline_plan import totals
from dvpo_lightning.commands.pipeline_spec import PipelineSpecError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted([*REPO.glob("configs/pipeline*.yaml"),
                  *REPO.glob("configs/instruct/pipeline*.yaml")])
DVPO, DPO, SFT = (str(REPO / "configs" / f"{n}.yaml") for n in ("dvpo", "dpo", "sft"))
# the example of docs/pipeline.md: DVPO over β × learning rate (the real keys of DVPOModule)
GRID = {"kl": {"arg": "model.init_args.kl.coef", "values": [0.01, 0.03]},
        "lr": {"arg": "model.init_args.optim.lr", "values": [3.0e-5, 1.0e-4]}}


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    monkeypatch.setenv(DEBUG_ENV, "0")


def write(tmp_path: Path, spec: dict, name: str = "study.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def study(**extra) -> dict:
    return {"stages": [{"name": "sft", "config": SFT, "artifact": "runs/s/sft/model"}],
            "seeds": [0, 1], "runs_dir": "runs/s",
            "methods": [{"name": "dvpo", "config": DVPO, "args": ["--trainer.max_steps=7"],
                         "grid": copy.deepcopy(GRID)},
                        {"name": "dpo", "config": DPO, "common": False}], **extra}


def error_of(tmp_path, spec: dict) -> str:
    path = write(tmp_path, spec)
    with pytest.raises(PipelineSpecError) as e:
        expand(load_file(path), path)
    assert str(e.value).startswith(f"{path}: ")
    return str(e.value)


# --- mistakes: one error each, naming the file, the key path and the fix ---------------------

def test_unknown_keys_are_refused_with_the_known_ones(tmp_path):
    err = error_of(tmp_path, study(sed_scope="pipeline"))
    assert "sed_scope: unknown key" in err and "seed_scope" in err and "workers" in err
    spec = study()
    spec["methods"][1]["grdi"] = GRID
    err = error_of(tmp_path, spec)
    assert "methods[1].grdi: unknown key" in err
    assert "known keys: name, config, args, common, grid" in err
    spec = study()
    spec["methods"][0]["grid"]["kl"]["valus"] = [1]
    assert "methods[0].grid.kl.valus: unknown key" in error_of(tmp_path, spec)
    assert "report.outt: unknown key" in error_of(tmp_path, study(report={"outt": "x"}))


@pytest.mark.parametrize("axis,where", [
    ({"arg": "model.init_args.kl.coef", "values": []}, "grid.kl.values: must be a non-empty list"),
    ({"values": [0.1]}, "grid.kl.arg: is required"),
    ({"arg": "model.init_args.kl.coef=0.1", "values": [0.1]}, "grid.kl.arg: must be a dotted"),
    ({"arg": "model.init_args.kl.coef", "values": [0.1, 0.1]}, "grid.kl.values: has a repeated"),
    ({"arg": "model.init_args.kl.coef", "values": [[0.1]]}, "grid.kl.values[0]: must be a number"),
    ({"arg": "model.init_args.kl.coef", "values": [0.1, 0.2], "labels": ["a"]},
     "grid.kl.labels: must be a list of 2 names"),
    ({"arg": "model.init_args.value_model", "values": ["runs/s/gvm/model"]},
     "grid.kl.values[0]: 'runs/s/gvm/model' cannot be spelled in a run name"),
])
def test_a_bad_grid_is_one_error_at_its_key(tmp_path, axis, where):
    spec = study()
    spec["methods"][0]["grid"] = {"kl": axis}
    err = error_of(tmp_path, spec)
    assert f"methods[0].{where}" in err, err


def test_duplicate_run_names_are_refused(tmp_path):
    spec = study()
    spec["methods"].append({"name": "dvpo", "config": DVPO})
    assert "methods[2].name: repeats an earlier name" in error_of(tmp_path, spec)
    spec = study()
    spec["methods"][0]["name"] = "sft"
    assert "methods[0].name: is also a stage's name" in error_of(tmp_path, spec)
    # 0.1 and "0.1" are two values but one spelling: two runs would share a directory
    spec = study()
    spec["methods"][0]["grid"] = {"kl": {"arg": "model.init_args.kl.coef", "values": [0.1, "0.1"]}}
    err = error_of(tmp_path, spec)
    assert "run name 'dvpo@kl=0.1'" in err and "share runs/s/dvpo@kl=0.1" in err
    spec = study(grid={"kl": GRID["kl"]})  # the study's axis again in a method
    assert "methods[0].grid.kl: repeats an axis of the study's grid" in error_of(tmp_path, spec)
    spec = study(grid={"beta": GRID["kl"]})  # two axes setting one key
    assert ("methods[0].grid.kl.arg: 'model.init_args.kl.coef' is also axis 'beta'"
            in error_of(tmp_path, spec))


def test_other_mistakes(tmp_path):
    assert "seeds: has a repeated seed" in error_of(tmp_path, study(seeds=[0, 0]))
    assert "seed_scope: must be one of" in error_of(tmp_path, study(seed_scope="seeds"))
    assert "workers: must be an integer >= 1" in error_of(tmp_path, study(workers=0))
    spec = study()
    spec["methods"][0]["config"] = "configs/nope.yaml"
    assert "methods[0].config: names no file" in error_of(tmp_path, spec)
    spec = study()
    spec["stages"][0]["args"] = ["trainer.max_steps=2"]
    assert "stages[0].args[0]: must be a --key=value string" in error_of(tmp_path, spec)
    err = error_of(tmp_path, study(only=["dvpo", "ppo"]))
    assert "only: 'ppo' names no stage, method or run" in err and "dvpo@kl=0.01,lr=3e-5" in err


def test_the_cli_reports_a_mistake_as_one_line_before_anything_runs(tmp_path, monkeypatch,
                                                                    capsys):
    monkeypatch.chdir(tmp_path)
    spec = study()
    spec["methods"][0]["grid"]["kl"]["values"] = []
    path = write(tmp_path, spec)
    with pytest.raises(SystemExit) as e:
        main(["pipeline", "--config", path])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {path}: methods[0].grid.kl.values: must be a non-empty")
    assert sorted(os.listdir(tmp_path)) == ["study.yaml"]
    path = write(tmp_path, study(seed_scop="pipeline"))  # the file's name, not jsonargparse's
    with pytest.raises(SystemExit) as e:
        main(["pipeline", "--config", path, "--dry_run", "true"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {path}: seed_scop: unknown key, got 'seed_scop'. known "
                             "keys: data, stages, methods, seeds,"), err


# --- grids -----------------------------------------------------------------------------------

def test_spelling_of_values_in_run_names():
    assert [spell(v) for v in (0.03, 1.0e-4, 3.0e-5, 1e20, 2, True, "cosine", 0.5)] == [
        "0.03", "0.0001", "3e-5", "1e20", "2", "true", "cosine", "0.5"]


def test_grid_points_expand_in_order_with_stable_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = study(grid={"beta": {"arg": "model.init_args.kl.coef", "values": [0.05, 0.2],
                               "labels": ["lo", "hi"]}})
    raw["methods"][0]["grid"] = {"lr": GRID["lr"]}
    spec = load_file(write(tmp_path, raw))
    variants = expand(spec)  # the study's axis first, crossed into DVPO (common), not DPO
    assert [v.name for v in variants] == ["dvpo@beta=lo,lr=3e-5", "dvpo@beta=lo,lr=0.0001",
                                          "dvpo@beta=hi,lr=3e-5", "dvpo@beta=hi,lr=0.0001",
                                          "dpo"]
    assert variants[3].point == {"beta": 0.2, "lr": 1.0e-4}
    assert variants[3].args == ["--model.init_args.kl.coef=0.2",
                                "--model.init_args.optim.lr=0.0001"]
    jobs = build_jobs(spec, variants)
    names = [j.stage.name for j in jobs]
    assert names[:3] == ["sft", "dvpo@beta=lo,lr=3e-5/seed0", "dvpo@beta=lo,lr=3e-5/seed1"]
    assert names[-2:] == ["dpo/seed0", "dpo/seed1"] and len(names) == 1 + 5 * 2
    job = jobs[names.index("dvpo@beta=hi,lr=0.0001/seed1")]
    root = "runs/s/dvpo@beta=hi,lr=0.0001/seed1"
    assert job.stage.artifact == f"{root}/model" and job.kind == "rl" and job.seed == 1
    # the point's overrides come last (they win over the method's own args)
    assert job.stage.args == ["--seed_everything=1", f"--trainer.default_root_dir={root}",
                              f"--model.init_args.export_dir={root}/model",
                              "--trainer.max_steps=7", "--model.init_args.kl.coef=0.2",
                              "--model.init_args.optim.lr=0.0001"]
    assert job.stage.env["WANDB_NAME"] == "dvpo@beta=hi,lr=0.0001-seed1"
    assert jobs[-1].kind == "dpo" and jobs[-1].stage.args[3:] == []


def test_grid_overrides_are_real_keys_of_the_dvpo_config(tmp_path, monkeypatch, capsys):
    """The docs' example grid, through the real CLI's parser: each override lands."""
    from dvpo_lightning.commands.fit import main as fit_main

    monkeypatch.chdir(tmp_path)
    spec = load_file(write(tmp_path, study()))
    job = build_jobs(spec, expand(spec))[4]  # dvpo@kl=0.01,lr=0.0001/seed1
    assert job.stage.name == "dvpo@kl=0.01,lr=0.0001/seed1"
    with pytest.raises(SystemExit) as e:
        fit_main(["fit", "--config", DVPO, *job.stage.args, "--print_config"])
    assert e.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    model = printed["model"]["init_args"]
    assert model["kl"]["coef"] == 0.01 and model["optim"]["lr"] == 1e-4
    assert model["export_dir"] == "runs/s/dvpo@kl=0.01,lr=0.0001/seed1/model"
    assert printed["trainer"]["default_root_dir"] == "runs/s/dvpo@kl=0.01,lr=0.0001/seed1"


# --- the planner -----------------------------------------------------------------------------

def test_dry_run_lists_every_job_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"out": "data/s", "seed": 0}))
    path = write(tmp_path, study(data="data.yaml", report={"out": "runs/s/report"}))
    before = sorted(os.listdir(tmp_path))
    main(["pipeline", "--config", path, "--dry_run", "true"])  # returns: exit status 0
    out = capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == before  # no data, no run directory, no stamp
    lines = out.splitlines()
    jobs = [ln.split() for ln in lines if ln[:4].strip().isdigit()]
    assert [j[4] for j in jobs] == ["data", "sft",
                                    *(f"{n}/seed{s}" for n in ("dvpo@kl=0.01,lr=3e-5",
                                                               "dvpo@kl=0.01,lr=0.0001",
                                                               "dvpo@kl=0.03,lr=3e-5",
                                                               "dvpo@kl=0.03,lr=0.0001", "dpo")
                                      for s in (0, 1))]
    assert all(j[1] == "run" for j in jobs)
    assert jobs[5][:4] == ["6", "run", "rl", "1"]
    assert jobs[5][6] == "runs/s/dvpo@kl=0.01,lr=0.0001/seed1/model"
    # only the overrides that differ from configs/dvpo.yaml (its lr is 1e-4 already)
    i = lines.index(next(ln for ln in lines if "dvpo@kl=0.01,lr=0.0001/seed1" in ln))
    assert [ln.strip() for ln in lines[i + 1:i + 3]] == ["--trainer.max_steps=7",
                                                         "--model.init_args.kl.coef=0.01"]
    assert "[plan] 12 jobs (1 data, 1 stage 1, 8 RL, 2 DPO): 12 to run (0 of them resumed), " \
           "0 reused, 0 skipped (--only)" in out
    dpo_steps = yaml.safe_load(Path(DPO).read_text())["trainer"]["max_steps"]
    assert f"trainer steps to run: RL {8 * 7}, DPO {2 * dpo_steps}" in out
    assert "time to run: unknown" in out
    assert "[plan] report: runs/s/report (5 methods and grid points, 10 runs)" in out


def test_only_selects_every_point_of_a_method(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = load_file(write(tmp_path, study(only=["dvpo"])))
    jobs = plan_jobs(spec, expand(spec))
    assert {j.name.split("@")[0].split("/")[0] for j in jobs if j.status == "run"} == {"dvpo"}
    assert totals(jobs)["status"] == {"run": 8, "resume": 0, "reuse": 0, "skip": 3}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_pipeline_parses_and_plans(path, monkeypatch):
    monkeypatch.chdir(REPO)
    spec = load_file(str(path.relative_to(REPO)))
    variants = expand(spec)
    jobs = plan_jobs(spec, variants)
    per_seed = len(spec.stages) if spec.seed_scope == "pipeline" else 0
    n = (bool(spec.data) + len(spec.stages) * (per_seed == 0)
         + len(spec.seeds) * (per_seed + len(variants)))
    assert len(jobs) == n
    assert {j.status for j in jobs} <= {"run", "resume", "reuse", "skip"}
