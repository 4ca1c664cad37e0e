"""W&B sweep files and the local sweep runner, offline.

(a) every file in ``configs/sweeps/``: the argument lists a W&B agent builds are accepted by the
real CLI and the values reach the module; (b) a KL sweep of a tiny DVPO run through
``python -m dvpo_lightning sweep``: one offline W&B run per trial in one group, the table and
the plot, a failed trial recorded while the others go on, a rerun that skips finished trials;
(c) invalid sweep files fail naming the key.
"""

from __future__ import annotations

import copy
import glob
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from wandb_offline import read_offline_run

from dvpo_lightning.__main__ import main
from dvpo_lightning.commands.fit import cli_main
from dvpo_lightning.commands.sweep.run import agent_args
from dvpo_lightning.commands.sweep.spec import SweepConfigError, expand_trials, validate_sweep

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))


def tiny_overrides(art: SimpleNamespace, task_data: str, root: Path) -> list[str]:
    """Paths to the fixtures and 2 RL steps of 2 prompts (2 epochs × 2 mini-batches = 8
    optimizer steps), evaluated once at the end on 4 held-out prompts."""
    return [f"--model.init_args.policy={art.policy}", f"--model.init_args.value_model={art.gvm}",
            f"--data.init_args.train_path={task_data}/rl_prompts.jsonl",
            f"--data.init_args.eval_path={task_data}/eval_prompts.jsonl",
            "--data.init_args.test_path=null",  # (the config's names the study's test file)
            f"--data.init_args.tokenizer={task_data}/tokenizer",
            "--data.init_args.batch_size=2", "--data.init_args.max_eval_prompts=4",
            "--model.init_args.ppo.mini_batch_size=1", "--model.init_args.rollout.max_new_tokens=8",
            f"--model.init_args.export_dir={root / 'policy'}",
            f"--trainer.default_root_dir={root}", "--trainer.max_steps=8",
            "--trainer.val_check_interval=2", "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--trainer.accelerator=cpu", "--trainer.devices=1"]


def sweep_config_path(spec: dict) -> str:
    """The ``--config`` the sweep's command passes (the agent runs it from the repo root)."""
    command = spec["command"]
    return str(REPO / command[command.index("--config") + 1])


def module_value(module, key: str):
    """The attribute a ``model.init_args.…`` key sets: ``hparams`` of the module, or an
    attribute of an injected part (``model.init_args.estimator.init_args.version``)."""
    parts = key.split(".")
    assert parts[:2] == ["model", "init_args"], key
    parts = [p for p in parts[2:] if p != "init_args"]
    if len(parts) == 1:
        return module.hparams[parts[0]]
    obj = getattr(module, parts[0])
    for p in parts[1:]:
        obj = getattr(obj, p)
    return obj


def test_agent_args_is_the_agents_format():
    assert agent_args({"model.init_args.kl.coef": 0.05,
                       "model.init_args.estimator.init_args.version": "code", "n": 3}) == [
        "--model.init_args.kl.coef=0.05", "--model.init_args.estimator.init_args.version=code",
        "--n=3"]


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_agent_args_reach_the_module(path, artifacts, task_data, tmp_path):
    spec = yaml.safe_load(path.read_text())
    validate_sweep(spec, source=str(path))
    assert spec["method"] in ("grid", "random") and spec["metric"]["name"] == "eval/gold_reward"
    trials = expand_trials(spec, max_trials=None if spec["method"] == "grid" else 3)
    for params in [trials[0], trials[len(trials) // 2], trials[-1]]:
        args = ["--config", sweep_config_path(spec), *agent_args(params),
                *tiny_overrides(artifacts, task_data, tmp_path), "--trainer.logger=false"]
        cli = cli_main(args=args, run=False)
        for key, value in params.items():
            assert cli.config[key] == value, key
            assert module_value(cli.model, key) == value, key


def test_random_search_is_seeded_and_capped():
    spec = {"method": "random", "run_cap": 5, "metric": {"name": "m", "goal": "minimize"},
            "parameters": {"lr": {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-3},
                           "kl": {"values": [0.01, 0.1]}, "k": {"min": 1, "max": 3}},
            "program": "train.py"}
    validate_sweep(spec)
    trials = expand_trials(spec, seed=1)
    assert len(trials) == 5 and trials == expand_trials(spec, seed=1)
    assert expand_trials(spec, max_trials=2, seed=1) == trials[:2]
    assert trials != expand_trials(spec, seed=2)
    for t in trials:
        assert 1e-5 <= t["lr"] <= 1e-3 and t["kl"] in (0.01, 0.1) and t["k"] in (1, 2, 3)


def test_local_kl_sweep(artifacts, task_data, tmp_path, monkeypatch, capsys):
    """configs/sweeps/kl.yaml with one bad value added: 3 trials finish, 1 fails."""
    monkeypatch.chdir(REPO)  # the sweep's command names configs/dvpo.yaml, as for the agent
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spec = yaml.safe_load((REPO / "configs" / "sweeps" / "kl.yaml").read_text())
    values = spec["parameters"]["model.init_args.kl.coef"]["values"]
    spec["parameters"]["model.init_args.kl.coef"]["values"] = [*values, "not-a-number"]
    sweep_file, out = tmp_path / "kl.yaml", tmp_path / "sweep"
    sweep_file.write_text(yaml.safe_dump(spec))
    extra = [a for a in tiny_overrides(artifacts, task_data, tmp_path / "unused")
             if not a.startswith(("--trainer.default_root_dir", "--model.init_args.export_dir"))]
    argv = ["sweep", str(sweep_file), "--out", str(out), "--parallel", "2", "--extra_args", *extra]
    main(argv)

    result = json.loads((out / "results.json").read_text())
    rows = result["trials"]
    assert [r["params"]["model.init_args.kl.coef"] for r in rows] == [*values, "not-a-number"]
    done = [r for r in rows if r["status"] == "finished"]
    assert len(done) == 3, rows
    for r in done:
        assert math.isfinite(r["gold_reward"]) and math.isfinite(r["kl_to_ref"]), r
        assert r["metric"] == r["gold_reward"]  # the sweep's metric, eval/gold_reward
    assert rows[3]["status"] == "failed" and rows[3]["returncode"] != 0
    assert "not-a-number" in (out / "trial-003" / "trial.log").read_text()
    best = max(done, key=lambda r: r["metric"])
    assert result["best"] == best["trial"]
    md = (out / "results.md").read_text()
    assert md.count("\n| trial-") == 4 and f"{best['trial']} **(best)**" in md
    png = (out / "reward_kl.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000

    # one offline W&B run per finished trial, all in the sweep's group, with the trial's value
    state = json.loads((out / "sweep_state.json").read_text())
    for r in done:
        runs = glob.glob(str(out / r["trial"] / "wandb" / "offline-run-*"))
        assert len(runs) == 1, (r["trial"], runs)
        run = read_offline_run(runs[0])
        assert run["group"] == state["group"]
        assert run["config"]["model"]["init_args"]["kl"]["coef"] == r["params"][
            "model.init_args.kl.coef"]
        assert any("eval/gold_reward" in row for row in run["history"])

    # a rerun skips the finished trials and retries the failed one
    capsys.readouterr()
    main(argv)
    log = capsys.readouterr().out
    state = json.loads((out / "sweep_state.json").read_text())
    for r in done:
        assert f"{r['trial']}: finished before, not rerun" in log
        assert state["trials"][r["trial"]]["attempts"] == 1
        assert len(glob.glob(str(out / r["trial"] / "wandb" / "offline-run-*"))) == 1
    assert state["trials"]["trial-003"]["attempts"] == 2


VALID = {"method": "grid", "metric": {"name": "eval/gold_reward", "goal": "maximize"},
         "parameters": {"model.init_args.kl.coef": {"values": [0.01, 0.1]}},
         "command": ["${env}", "${interpreter}", "-m", "dvpo_lightning", "fit", "${args}"]}


def _edit(path: str, value):
    spec = copy.deepcopy(VALID)
    *parents, last = path.split("/")
    node = spec
    for p in parents:
        node = node[p]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return spec


@pytest.mark.parametrize("path,value,named", [
    ("method", "hyperband", "method"),
    ("method", None, "method"),
    ("metric/goal", "up", "metric.goal"),
    ("metric/name", None, "metric.name"),
    ("metric/target_value", 1, "metric.target_value"),
    ("paramters", {}, "'paramters'"),
    ("parameters", {}, "parameters"),
    ("parameters/model.init_args.kl.coef", {"value_list": [1]},
     "parameters.model.init_args.kl.coef"),
    ("parameters/model.init_args.kl.coef", {"distribution": "zipf", "min": 0, "max": 1},
     "parameters.model.init_args.kl.coef.distribution"),
    ("parameters/model.init_args.kl.coef", {"min": 0.1, "max": 0.01},
     "parameters.model.init_args.kl.coef"),
    ("parameters/model.init_args.kl.coef", {"values": []},
     "parameters.model.init_args.kl.coef.values"),
    ("parameters/model.init_args.kl.coef", {"distribution": "uniform", "min": 0.0, "max": 1.0},
     "grid search needs discrete"),
    ("run_cap", 0, "run_cap"),
    ("command", ["python", "-m", "dvpo_lightning", "fit"], "${args}"),
    ("command", ["${env}", "${args_json}", "${args}"], "${args_json}"),
])
def test_invalid_sweep_names_the_key(path, value, named):
    with pytest.raises(SweepConfigError) as err:
        validate_sweep(_edit(path, value), source="bad.yaml")
    assert named in str(err.value) and "bad.yaml" in str(err.value)


@pytest.mark.parametrize("edit,named", [
    ({"method": "bayes"}, "W&B server"),
    ({"method": "random", "parameters": {"lr": {"min": 0.1, "max": 1.0}}}, "run_cap"),
])
def test_sweeps_the_runner_cannot_expand(edit, named):
    spec = {**VALID, **edit}
    validate_sweep(spec)
    with pytest.raises(SweepConfigError, match=named):
        expand_trials(spec)


def test_wandb_schema_is_installed_and_checks_what_the_runner_does_not():
    """W&B's published schema (``sweeps`` package, installed by setup.sh without its numpy<2
    pin) catches what the hand-written checks leave alone, naming the key."""
    from dvpo_lightning.commands.sweep.schema import schema_violations, wandb_schema_path

    assert wandb_schema_path() is not None, "scripts/setup.sh installs sweeps --no-deps"
    for f in SWEEPS:
        assert schema_violations(yaml.safe_load(f.read_text())) == [], f
    bad = {**VALID, "early_terminate": {"type": "hyperbandd", "min_iter": 3}}
    with pytest.raises(SweepConfigError) as err:
        validate_sweep(bad, source="bad.yaml")
    msg = str(err.value)
    assert "bad.yaml: does not follow W&B's sweep schema" in msg and "early_terminate" in msg
    bad = {**VALID, "parameters": {"model.init_args.kl.coef": {"values": [0.1]},
                                   "1bad name": {"value": 1}}}
    with pytest.raises(SweepConfigError, match="parameters"):
        validate_sweep(bad, source="bad.yaml")


def test_invalid_sweep_file_is_a_cli_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_edit("metric/goal", "up")))
    with pytest.raises(SystemExit) as e:
        main(["sweep", str(bad), "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "metric.goal" in err and str(bad) in err
    assert not (tmp_path / "out").exists()  # nothing run, nothing written
