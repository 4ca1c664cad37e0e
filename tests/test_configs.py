"""Every config is a test case: each YAML under ``configs/`` is parsed by the real CLI and
instantiated tiny (litgpt ``tests/test_config_hub.py``).

Configs are discovered by glob, so a new one is covered the day it is added. Each YAML is
classified by its content:

- ``model:`` key → a LightningCLI config: parsed with ``cli_main(args=[...], run=False)`` and
  instantiated (Trainer, LightningModule, DataModule). Paths in it are pointed at the session's
  tiny fixtures by CLI overrides (the file itself is what is parsed):

  * ``data/sorting/<file>`` → the same file of the tiny task data;
  * ``runs/<task>/<stage>/model`` → a tiny artifact of that stage (``ARTIFACTS``: ``sft``,
    ``reward_model``, ``gvm``); add an entry for a config that reads another stage's artifact;
  * output keys (``OUTPUT_KEYS``: ``export_dir``, ``default_root_dir``, ...) → a temp dir;
  * ``OVERRIDES[class_path]``: extra overrides per model class, for what the rules above
    cannot know (e.g. SFT starts from ``tiny-llama``; the test uses ``test-llama``).

  Paths inside YAML lists (e.g. callbacks) are not rewritten: such classes must not touch
  their files at construction. A config that cannot be instantiated this way fails with the
  overrides used and the error, never skips.
- keys that are all arguments of ``make_task_data`` → a ``data`` command config: run through
  the ``data`` command's parser with a temp ``--out`` and small counts.
- ``stages:`` key → a ``pipeline`` config: every stage config exists and exports where the
  pipeline expects its artifact.
- wandb sweeps (``method`` + ``parameters``, or under a ``sweeps`` folder) are not run here.

Anything else fails ``test_every_config_is_classified``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
from pathlib import Path

import pytest
import yaml

from dvpo_lightning.commands.data import main as data_main
from dvpo_lightning.commands.data.instruct import make_instruct_data
from dvpo_lightning.commands.data.sorting import make_task_data
from dvpo_lightning.commands.fit import cli_main
from dvpo_lightning.data.base import TokenizedDataModule

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
ALL_CONFIGS = sorted(p for ext in ("*.yaml", "*.yml") for p in CONFIG_DIR.rglob(ext))

OUTPUT_KEYS = {"export_dir", "default_root_dir", "dirpath", "save_dir", "log_dir", "output_dir"}
ARTIFACT_RE = re.compile(r"^runs/[^/]+/(?P<stage>[^/]+)/model/?$")
ARTIFACTS = {"sft": "sft", "reward_model": "reward", "gvm": "gvm"}  # stage dir → fixture kind
OVERRIDES: dict[str, list[str]] = {
    # random init: the test-sized model instead of the config's tiny-llama
    "dvpo_lightning.modules.SFTModule": ["--model.init_args.backbone=test-llama"],
}
DATA_ARGS = set(inspect.signature(make_task_data).parameters)
INSTRUCT_ARGS = set(inspect.signature(make_instruct_data).parameters)
# The instruction setting's configs load SmolLM2-135M-Instruct and its sampled data: they run
# for real, every one, in tests/test_instruct_pipeline.py (the smoke pipeline).
REAL_MODEL_DIR = CONFIG_DIR / "instruct"


def load(path: Path):
    return yaml.safe_load(path.read_text())


def classify(path: Path) -> str | None:
    doc = load(path)
    if not isinstance(doc, dict):
        return None
    if isinstance(doc.get("model"), dict) and set(doc) == {"model"} and (
            "class_path" not in doc["model"]):
        if set(doc["model"].get("init_args", {})) == {"refresh"}:
            return "refresh"  # an add-on: a second --config turning the refresh on
        if set(doc["model"].get("init_args", {})) == {"online"}:
            return "online"  # an add-on: a second --config turning online DPO on
        return "engine"  # an add-on: a second --config setting the RL module's rollout engine
    if isinstance(doc.get("model"), dict):  # (an instruct data config names a model path)
        return "cli"
    if set(doc) == {"trainer"} and "strategy" in doc["trainer"]:
        return "strategy"  # an add-on: a second --config after a stage's
    if "sweeps" in path.parts or {"method", "parameters"} <= set(doc):
        return "sweep"
    if "stages" in doc:
        return "pipeline"
    if doc and (set(doc) <= DATA_ARGS or doc.get("task") == "instruct"
                and set(doc) <= INSTRUCT_ARGS):
        return "data"
    return None


def configs_of(kind: str) -> list:
    found = [p for p in ALL_CONFIGS if classify(p) == kind]
    return [pytest.param(p, id=str(p.relative_to(CONFIG_DIR))) for p in found]


def test_configs_exist_and_every_config_is_classified():
    names = {p.name for p in ALL_CONFIGS}
    assert {"sft.yaml", "reward_model.yaml", "gvm.yaml", "data.yaml"} <= names
    unknown = [str(p.relative_to(REPO)) for p in ALL_CONFIGS if classify(p) is None]
    assert not unknown, (
        f"configs of no known kind: {unknown}. A LightningCLI config needs a top-level `model:`; "
        f"a data config only arguments of make_task_data ({sorted(DATA_ARGS)}); a pipeline "
        "config `stages:`. Otherwise teach classify() in tests/test_configs.py about it.")


# --- LightningCLI configs -------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifacts(sft_model_dir, tmp_path_factory) -> dict[str, str]:
    """Tiny artifacts of every stage a config can start from (value heads untrained)."""
    from dvpo_lightning.models import ValueModel, load_tokenizer

    out = {"sft": sft_model_dir}
    tok = load_tokenizer(sft_model_dir)
    root = tmp_path_factory.mktemp("artifacts")
    for kind in ("reward", "gvm"):
        vm = ValueModel.from_pretrained(sft_model_dir, tok, kind=kind, zero_init_head=False)
        vm.save_pretrained(root / kind)
        tok.save_pretrained(str(root / kind))
        out[kind] = str(root / kind)
    return out


def fixture_overrides(doc: dict, task_data: str, artifacts: dict, tmp: Path) -> list[str]:
    """``--a.b.c=value`` for every path in ``doc`` (dicts only) that must point at fixtures."""
    args: list[str] = []

    def walk(node, prefix: str) -> None:
        if not isinstance(node, dict):
            return
        for key, value in node.items():
            dotted = f"{prefix}.{key}" if prefix else key
            if isinstance(value, dict):
                walk(value, dotted)
            elif isinstance(value, str):
                if key in OUTPUT_KEYS:
                    args.append(f"--{dotted}={tmp / dotted}")
                elif value.startswith("data/sorting/"):
                    target = Path(task_data) / value[len("data/sorting/"):]
                    if not target.exists():
                        pytest.fail(f"{dotted}={value!r}: the tiny task data has no {target.name}")
                    args.append(f"--{dotted}={target}")
                elif m := ARTIFACT_RE.match(value):
                    stage = m["stage"]
                    if stage not in ARTIFACTS:
                        pytest.fail(f"{dotted}={value!r}: no tiny artifact for stage {stage!r}; "
                                    f"known: {sorted(ARTIFACTS)}. Add it to ARTIFACTS and the "
                                    "`artifacts` fixture in tests/test_configs.py")
                    args.append(f"--{dotted}={artifacts[ARTIFACTS[stage]]}")

    walk(doc, "")
    return args


def resolve(class_path: str):
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("path", configs_of("cli"))
def test_lightning_config_parses_and_instantiates(path, task_data, artifacts, tmp_path, capsys):
    if REAL_MODEL_DIR in path.parents:
        pytest.skip("a real-model config: instantiated and run by tests/test_instruct_pipeline.py")
    doc = load(path)
    class_path = doc["model"]["class_path"]
    args = ["--config", str(path), *fixture_overrides(doc, task_data, artifacts, tmp_path),
            *OVERRIDES.get(class_path, [])]
    try:
        cli = cli_main(args=args, run=False)
    except (Exception, SystemExit) as err:  # noqa: BLE001 - reported with its context
        pytest.fail(f"{path.relative_to(REPO)} could not be instantiated with the tiny fixtures.\n"
                    f"args: {args}\nerror: {err!r}\nstderr: {capsys.readouterr().err[-3000:]}\n"
                    "If it needs another fixture, extend OVERRIDES / ARTIFACTS in "
                    "tests/test_configs.py")

    assert isinstance(cli.model, resolve(class_path))
    data_doc = doc.get("data")
    if isinstance(data_doc, dict) and "class_path" in data_doc:
        assert isinstance(cli.datamodule, resolve(data_doc["class_path"]))
    assert cli.trainer is not None
    overridden = {a.split("=", 1)[0][2:] for a in args if a.startswith("--") and "=" in a}

    # every value the YAML sets (and the test did not override) is what the CLI parsed
    def check(node, parsed, dotted: str) -> None:
        for key, value in node.items():
            sub = f"{dotted}.{key}"
            if sub in overridden:
                continue
            got = parsed[key]
            if isinstance(value, dict):
                check(value, got, sub)
            elif not isinstance(value, list):
                assert got == value, f"{sub}: YAML {value!r}, parsed {got!r}"

    for section in ("trainer", "model", "data"):
        if isinstance(doc.get(section), dict):
            check(doc[section], cli.config[section], section)
    if "tokenizer" in cli.model.hparams and isinstance(cli.datamodule, TokenizedDataModule):
        assert cli.model.hparams.tokenizer == cli.datamodule.tokenizer_path  # the CLI link

    # the stage-1 DataModules read the fixture files and give a batch
    if isinstance(cli.datamodule, TokenizedDataModule):
        cli.datamodule.setup("fit")
        batch = next(iter(cli.datamodule.train_dataloader()))
        assert batch["prompt_ids"].shape[0] > 0


# --- data and pipeline configs --------------------------------------------------------------

SMALL_COUNTS = dict(n_sft=12, n_trajectory_prompts=10, n_rl_prompts=4, n_eval_prompts=4,
                    n_eval_pair_prompts=6)


@pytest.mark.parametrize("path", configs_of("data"))
def test_data_config_parses_and_generates(path, tmp_path, capsys):
    doc = load(path)
    if doc.get("task") == "instruct":  # samples from a real model: run by the smoke pipeline
        assert set(doc) <= INSTRUCT_ARGS, sorted(set(doc) - INSTRUCT_ARGS)
        return
    out = tmp_path / "data"
    args = ["--config", str(path), "--out", str(out)]
    for k, v in SMALL_COUNTS.items():
        args += [f"--{k}", str(v)]
    data_main(args)
    assert "task data written: sft 12" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    for key, value in doc.items():
        if key != "out" and key not in SMALL_COUNTS:
            assert manifest["args"].get(key, manifest.get(key)) == value, key
    assert (out / "tokenizer").is_dir()


@pytest.mark.parametrize("path", configs_of("pipeline"))
def test_pipeline_config_is_consistent(path):
    spec = load(path)
    if spec.get("data"):
        assert classify(REPO / spec["data"]) == "data", spec["data"]
    artifacts = [s["artifact"] for s in spec["stages"]]
    assert len(set(artifacts)) == len(artifacts), "two stages write the same artifact"
    for stage in spec["stages"]:  # the pipeline sets each stage's export_dir to its artifact
        cfg = REPO / stage["config"]
        assert cfg.exists() and classify(cfg) == "cli", stage
    runs_dir = spec.get("runs_dir", "runs")
    for entry in [*spec["stages"], *spec.get("methods", [])]:  # a stage-1 path in an override
        for arg in entry.get("args") or []:                      # names a declared artifact
            value = arg.partition("=")[2]
            if value.startswith(f"{runs_dir}/") and value.endswith("/model"):
                assert value in artifacts, (entry["name"], arg)
    for method in spec.get("methods", []):  # the pipeline sets each run's export_dir itself
        cfg = REPO / method["config"]
        assert cfg.exists() and classify(cfg) == "cli", method
        module = load(cfg)["model"]["class_path"]
        assert module.endswith(("DVPOModule", "DPOModule")), method
        # the common args are the RL runs' overrides: a DPO run takes its own; an RL run
        # outside the study's grid (common: false, a long run) lists them itself
        if module.endswith("DPOModule"):
            assert method.get("common", True) is False, method
        elif not method.get("common", True):
            assert set(spec.get("common_args", [])) <= set(method.get("args") or []), method
    report = spec.get("report", {})
    for key in ("gvm", "reward_model"):
        if report.get(key):
            assert report[key] in artifacts, key
    for method, gvm in (report.get("gvm_sweep") or {}).items():
        assert gvm in artifacts and method in [m["name"] for m in spec["methods"]], method
    for key in ("eval_pairs", "shifted_pairs"):
        if report.get(key) and spec.get("data"):  # a file the data step writes
            out = load(REPO / spec["data"])["out"]
            assert Path(report[key]).parent == Path(out), key


def _pipeline_commands():
    for param in configs_of("pipeline"):
        path = param.values[0]
        spec = load(path)
        for stage in spec["stages"]:
            yield pytest.param(stage["config"], stage.get("args") or [],
                               id=f"{path.name}:{stage['name']}")
        for m in spec.get("methods", []):
            common = spec.get("common_args", []) if m.get("common", True) else []
            # every grid and tune axis at its first value: the keys a point's run adds
            axes = [*((spec.get("grid") or {}).values() if m.get("common", True) else []),
                    *(m.get("grid") or {}).values(), *(m.get("tune") or {}).values()]
            points = [f"--{a['arg']}={a['values'][0]}" for a in axes]
            yield pytest.param(m["config"], [*common, *(m.get("args") or []), *points],
                               id=f"{path.name}:{m['name']}")


@pytest.mark.parametrize("config,args", list(_pipeline_commands()))
def test_pipeline_overrides_parse(config, args, capsys):
    """Every command a pipeline runs names only valid keys (parsed, not run: some need a GPU)."""
    from dvpo_lightning.commands.fit import main

    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(REPO / config), *args, "--print_config"])
    assert e.value.code in (0, None), capsys.readouterr().err[-2000:]


@pytest.mark.parametrize("path", configs_of("online"))
def test_online_configs_add_to_dpo(path, capsys):
    """``configs/online_dpo.yaml`` merges with DPO's config: the rounds are on, DPO's own
    settings stay (parsed only; tests/test_online_dpo.py runs the rounds)."""
    from dvpo_lightning.commands.fit import main

    want = load(path)["model"]["init_args"]["online"]
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(CONFIG_DIR / "dpo.yaml"), "--config", str(path),
              "--print_config"])
    assert e.value.code in (0, None), capsys.readouterr().err[-2000:]
    init = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert want.items() <= init["online"].items() and want["every"] > 0
    own = load(CONFIG_DIR / "dpo.yaml")["model"]["init_args"]
    for group in ("dpo", "optim", "rollout"):
        assert own[group].items() <= init[group].items(), group
    assert Path(want["prompts_path"]).name == "rl_prompts.jsonl"


@pytest.mark.parametrize("path", configs_of("strategy"))
def test_strategy_configs_add_to_every_stage(path, capsys):
    """Each ``configs/deepspeed/*.yaml`` merges with every stage config into a valid command
    (parsed only: they need a GPU)."""
    from dvpo_lightning.commands.fit import main

    for stage in ("sft", "gvm", "dvpo", "ppo"):
        with pytest.raises(SystemExit) as e:
            main(["fit", "--config", str(CONFIG_DIR / f"{stage}.yaml"), "--config", str(path),
                  "--print_config"])
        assert e.value.code in (0, None), capsys.readouterr().err[-2000:]
        out = capsys.readouterr().out  # (DeepSpeed's import logs a "[date] [WARNING]" line)
        printed = yaml.safe_load("\n".join(x for x in out.splitlines() if not x.startswith("[")))
        strategy = printed["trainer"]["strategy"]
        assert strategy["class_path"].endswith("DeepSpeedStrategy"), stage
        assert strategy["init_args"]["stage"] == load(path)["trainer"]["strategy"][
            "init_args"]["stage"]
        assert printed["model"]["class_path"] == load(CONFIG_DIR / f"{stage}.yaml")["model"][
            "class_path"]


@pytest.mark.parametrize("path", configs_of("engine"))
def test_engine_configs_add_to_every_rl_config(path, capsys):
    """Each ``configs/engines/*.yaml`` merges with every RL config: the engine changes, the
    method and its other settings stay (parsed only)."""
    from dvpo_lightning.commands.fit import main

    want = load(path)["model"]["init_args"]["rollout"]["engine"]
    for method in ("dvpo", "ppo", "grpo", "remax", "rloo", "instruct/dvpo"):
        with pytest.raises(SystemExit) as e:
            main(["fit", "--config", str(CONFIG_DIR / f"{method}.yaml"), "--config", str(path),
                  "--print_config"])
        assert e.value.code in (0, None), capsys.readouterr().err[-2000:]
        out = capsys.readouterr().out
        printed = yaml.safe_load("\n".join(x for x in out.splitlines() if not x.startswith("[")))
        init = printed["model"]["init_args"]
        assert init["rollout"]["engine"] == want, method
        own = load(CONFIG_DIR / f"{method}.yaml")["model"]["init_args"]
        for group in ("rollout", "ppo", "kl"):  # the method's own settings survive the merge
            assert own.get(group, {}).items() <= init[group].items(), (method, group)


@pytest.mark.parametrize("path", configs_of("refresh"))
def test_refresh_configs_add_to_dvpo_and_ppo(path, capsys):
    """``configs/semi_online.yaml`` merges with DVPO's and PPO's configs: the refresh is on,
    the method's own settings stay (parsed only; tests/test_refresh_rl.py runs the refresh)."""
    from dvpo_lightning.commands.fit import main

    want = load(path)["model"]["init_args"]["refresh"]
    for method in ("dvpo", "ppo"):
        with pytest.raises(SystemExit) as e:
            main(["fit", "--config", str(CONFIG_DIR / f"{method}.yaml"), "--config", str(path),
                  "--print_config"])
        assert e.value.code in (0, None), capsys.readouterr().err[-2000:]
        printed = yaml.safe_load(capsys.readouterr().out)
        init = printed["model"]["init_args"]
        assert want.items() <= init["refresh"].items() and want["every"] > 0, method
        own = load(CONFIG_DIR / f"{method}.yaml")["model"]["init_args"]
        for group in ("rollout", "ppo", "kl"):
            assert own.get(group, {}).items() <= init[group].items(), (method, group)


@pytest.mark.parametrize("path", configs_of("strategy"))
def test_strategy_configs_are_refused_without_a_gpu(path):
    """On a machine without CUDA the CLI refuses before loading any model, naming the fix."""
    import torch

    from dvpo_lightning.commands.fit import cli_main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        cli_main(["--config", str(CONFIG_DIR / "dvpo.yaml"), "--config", str(path),
                  "--model.init_args.policy=does-not-exist"], run=False)
