"""The command line: help from docstrings, printed configs, overrides, and errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dvpo_lightning.__main__ import COMMANDS, main
from dvpo_lightning.commands.fit import cli_main

REPO = Path(__file__).resolve().parents[1]
SFT_YAML = str(REPO / "configs" / "sft.yaml")


def flat(text: str) -> str:
    """Help text with its line wrapping undone."""
    return re.sub(r"\s+", " ", text)


@pytest.fixture()
def sft_args(task_data, tmp_path) -> list[str]:
    """``configs/sft.yaml`` pointed at the tiny fixtures (``run=False`` takes no subcommand)."""
    return ["--config", SFT_YAML,
            "--model.init_args.backbone=test-llama",
            f"--model.init_args.export_dir={tmp_path / 'model'}",
            f"--data.init_args.train_path={Path(task_data) / 'sft.jsonl'}",
            f"--data.init_args.tokenizer={Path(task_data) / 'tokenizer'}",
            f"--trainer.default_root_dir={tmp_path}"]


def test_fit_help_subprocess():
    env = {**os.environ, "COLUMNS": "100"}
    res = subprocess.run([sys.executable, "-m", "dvpo_lightning", "fit", "--help"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    out = flat(res.stdout)
    assert "--model CONFIG | CLASS_PATH_OR_NAME" in out
    assert "--data CONFIG | CLASS_PATH_OR_NAME" in out
    assert "data.init_args.tokenizer --> model.init_args.tokenizer" in out  # the link
    assert "Whether to enable model summarization by default" in out  # an argument docstring


@pytest.mark.parametrize("cls,line", [
    ("dvpo_lightning.modules.SFTModule", "--model.optim.lr LR peak learning rate."),
    ("GVMModule", "--model.returns.target {td0,td_lambda,mc} ``td0``: the paper's Eq. 1"),
    # the base's arguments, reached through the GVM's **kwargs, keep their documentation
    ("GVMModule", "--model.zero_init_head {true,false} start the head at zero"),
    ("DVPOModule", "--model.optim.critic_lr CRITIC_LR the critic's learning rate"),
])
def test_model_help_shows_init_docstrings(cls, line, capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--model.help", cls])
    assert e.value.code in (0, None)
    assert line in flat(capsys.readouterr().out)


def test_top_level_help_lists_every_command_and_the_debug_switches(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in COMMANDS)
    assert "--debug right after COMMAND" in flat(out) and "DVPO_DEBUG=1" in out


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_help_exits_0(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code in (0, None)
    out = capsys.readouterr().out
    assert out.lower().startswith("usage:") and "--help" in out


def test_data_command_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", "--help"])
    assert e.value.code in (0, None)
    out = flat(capsys.readouterr().out)
    assert "--n_sft N_SFT SFT demonstrations." in out


def test_print_config_shows_model_class_and_overrides(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", SFT_YAML, "--model.optim.lr=0.5", "--print_config"])
    assert e.value.code in (0, None)
    out = capsys.readouterr().out
    assert "class_path: dvpo_lightning.modules.SFTModule" in out
    assert "class_path: dvpo_lightning.data.sft.SFTDataModule" in out
    assert re.search(r"^\s+lr: 0\.5$", out, re.M), out
    assert re.search(r"^\s+warmup_steps: 100$", out, re.M)  # from the YAML
    assert re.search(r"^\s+tokenizer: data/sorting/tokenizer$", out, re.M)


@pytest.mark.parametrize("lr_flag", ["--model.init_args.optim.lr=0.5", "--model.optim.lr=0.5"])
def test_overrides_land_in_the_objects(lr_flag, sft_args):
    cli = cli_main(args=[*sft_args, lr_flag, "--trainer.max_steps=3", "--data.batch_size=7"],
                   run=False)
    assert cli.model.optim.lr == 0.5
    assert cli.model.optim.warmup_steps == 100  # from the YAML: the group keeps its other keys
    assert cli.trainer.max_steps == 3
    assert cli.datamodule.batch_size == 7
    assert cli.trainer.max_epochs == 3  # from the YAML, untouched
    # the tokenizer is named once, in data, and linked into the model
    assert cli.model.hparams.tokenizer == cli.datamodule.tokenizer_path
    assert cli.model.hparams.tokenizer.endswith("tokenizer")
    assert len(cli.model.tokenizer) == cli.model.model.config.vocab_size


@pytest.mark.parametrize("bad,name", [
    ("--model.init_args.no_such_arg=1", "no_such_arg"),
    ("--trainer.no_such_flag=1", "no_such_flag"),
    ("--data.init_args.batch_sise=4", "batch_sise"),
])
def test_unknown_key_is_an_error(bad, name, sft_args, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(args=[*sft_args, bad], run=False)
    assert e.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "error:" in err.lower() and name in err, err[-2000:]


@pytest.mark.parametrize("key,bad,allowed", [
    ("model.init_args.returns.target", "td2", "Literal['td0', 'td_lambda', 'mc']"),
    ("model.init_args.returns.positions", "every", "Literal['all', 'before_token']"),
    ("model.init_args.models.dtype", "fp8", "'float32', 'bfloat16', 'float16'"),
    ("data.init_args.train_kind", "ranked", "Literal['scored', 'pairwise']"),
    ("data.init_args.length_policy", "cut", "Literal['truncate', 'drop', 'error']"),
])
def test_a_closed_choice_outside_it_is_refused_with_the_allowed_list(key, bad, allowed, capsys):
    # every closed choice of a stage is a Literal: the CLI refuses a value outside it, naming
    # the key and the allowed values, before anything loads
    with pytest.raises(SystemExit) as e:
        cli_main(args=["--config", str(REPO / "configs" / "gvm.yaml"), f"--{key}={bad}"],
                 run=False)
    assert e.value.code not in (0, None)
    err = flat(capsys.readouterr().err)
    assert key.replace("init_args.", "").split(".")[-1] in err and allowed in err and bad in err


def test_an_invalid_number_states_the_rule_and_the_key():
    from dvpo_lightning.modules import OptimSettings, ReturnTargets

    with pytest.raises(ValueError, match=r"model.init_args.returns: lam must be in \[0, 1\]"):
        ReturnTargets(lam=1.5)
    with pytest.raises(ValueError, match=r"model.init_args.optim: min_lr_ratio must be in "
                                         r"\[0, 1\].*Fix the model.init_args.optim"):
        OptimSettings(min_lr_ratio=2.0)


def test_a_null_reaches_a_setting_in_a_group_inside_a_group(capsys):
    """``--model.init_args.rollout.vllm.logp_tolerance=null`` (a dataclass inside a dataclass)
    sets that field to null and keeps the settings around it (jsonargparse alone refuses it)."""
    dvpo_yaml = str(REPO / "configs" / "dvpo.yaml")
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", dvpo_yaml, "--model.init_args.rollout.vllm.dtype=bfloat16",
              "--model.init_args.rollout.vllm.logp_tolerance=null",
              "--model.init_args.ppo.max_grad_norm", "null", "--print_config"])
    assert e.value.code in (0, None)
    out = capsys.readouterr().out
    assert re.search(r"^\s+logp_tolerance: null$", out, re.M), out
    assert re.search(r"^\s+max_grad_norm: null$", out, re.M)
    assert re.search(r"^\s+dtype: bfloat16$", out, re.M)  # the group's earlier override stays
    assert re.search(r"^\s+max_new_tokens: 16$", out, re.M)  # and the outer group's values
