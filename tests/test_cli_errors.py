"""The command line's failures, through the real entry point (``__main__.main`` or
``python -m dvpo_lightning``): bad input is one ``error:`` message and exit status 2 (a
traceback only with ``--debug`` / ``DVPO_DEBUG=1``), real bugs keep their traceback, and a
``fit`` reads and checks its data files, and its RL rollout batch, before any model loads.

Every ``fit`` here names a model that cannot load (``/does/not/exist``): the error printed must
be the data's, which proves no model was built first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from jsonargparse import Namespace

from dvpo_lightning.__main__ import main
from dvpo_lightning.commands.errors import DEBUG_ENV, reported_errors
from dvpo_lightning.commands.fit import cli_main, estimator_group_size
from dvpo_lightning.data import DataFormatError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
MISSING = "/does/not/exist"
ENGLISH = [{"prompt": "Write a poem about the sea",
            "response": "The waves roll in and out, and the gulls cry over the grey water."},
           {"prompt": "Name a colour", "response": "Blue, like the sky at noon."}]


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    """Tests start without DVPO_DEBUG (and get it back unset after ``--debug`` set it)."""
    monkeypatch.setenv(DEBUG_ENV, "0")


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run_main(args: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of ``python -m dvpo_lightning ARGS``, in this process."""
    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code, capsys.readouterr().err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


def sft_fit(tmp_path: Path, train_path: str, tokenizer: str, *extra: str) -> list[str]:
    """``fit`` of configs/sft.yaml on ``train_path`` with a backbone that cannot load."""
    return ["fit", "--config", str(CONFIGS / "sft.yaml"),
            f"--model.init_args.backbone={MISSING}", f"--data.init_args.train_path={train_path}",
            f"--data.init_args.tokenizer={tokenizer}", f"--trainer.default_root_dir={tmp_path}",
            *extra]


def value_fit(config: str, root, train_path, task_data, tokenizer_dir) -> list[str]:
    """``fit`` of a value-model stage (GVM, reward model) on ``train_path``, its backbone
    missing: what is refused must be refused before it loads."""
    return ["fit", "--config", str(CONFIGS / config), f"--model.init_args.backbone={MISSING}",
            f"--data.init_args.train_path={train_path}",
            f"--data.init_args.val_path={Path(task_data) / 'eval_pairs.jsonl'}",
            f"--data.init_args.tokenizer={tokenizer_dir}", f"--trainer.default_root_dir={root}"]


def rl_fit(config: str, task_data: str, tmp_path: Path, *extra: str) -> list[str]:
    """``fit`` of an RL config on the tiny prompts, every model path missing."""
    return ["fit", "--config", str(CONFIGS / config),
            f"--model.init_args.policy={MISSING}/policy",
            f"--data.init_args.train_path={Path(task_data) / 'rl_prompts.jsonl'}",
            f"--data.init_args.eval_path={Path(task_data) / 'eval_prompts.jsonl'}",
            "--data.init_args.test_path=null",  # (the config's names the study's test file)
            f"--data.init_args.tokenizer={Path(task_data) / 'tokenizer'}",
            f"--trainer.default_root_dir={tmp_path}", *extra]


# --- one message, exit status 2 ------------------------------------------------------------


def test_bad_row_is_one_error_line(tmp_path, tokenizer_dir, capsys):
    bad = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "12=", "response": "12"},
                                               {"prompt": "21=", "reply": "12"}])
    code, err = run_main(sft_fit(tmp_path, bad, tokenizer_dir), capsys)
    assert code == 2
    assert "Traceback" not in err
    assert error_lines(err) == [
        f"error: {bad}, row 1 (line 2): field 'response' is missing (this row has: prompt, "
        "reply; format 'flat' expects: prompt, response (or completion)). Fix: add 'response' "
        "to every row, or pass the right format= if the file is in another format"]


def test_subprocess_error_then_traceback_with_debug(tmp_path, tokenizer_dir):
    """The real process: the message alone and status 2; ``--debug`` after the command name
    prints the traceback instead."""
    bad = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": 5, "response": "12"}])
    args = sft_fit(tmp_path, bad, tokenizer_dir)
    env = {**os.environ, DEBUG_ENV: "0"}
    res = subprocess.run([sys.executable, "-m", "dvpo_lightning", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert res.stderr.rstrip().splitlines()[-1] == (
        f"error: {bad}, row 0 (line 1): field 'prompt' must be a string or a list of messages, "
        "found int (5). Fix: write \"...\" or [{\"role\": \"user\", \"content\": \"...\"}]")
    res = subprocess.run([sys.executable, "-m", "dvpo_lightning", "fit", "--debug", *args[1:]],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1
    assert "Traceback (most recent call last)" in res.stderr
    assert "DataFormatError: " in res.stderr and not error_lines(res.stderr)


def test_checks_inside_the_model_are_one_line_too(tmp_path, task_data, tokenizer_dir, capsys):
    """jsonargparse re-raises what a model's ``__init__`` raises as its own long ValueError;
    the original message is what is printed."""
    sft = str(Path(task_data) / "sft.jsonl")
    code, err = run_main(sft_fit(tmp_path, sft, tokenizer_dir), capsys)
    assert code == 2 and "Traceback" not in err
    [line] = error_lines(err)
    assert line.startswith(f"error: model '{MISSING}' is neither a local directory, a .gguf "
                           "file, a named model nor a tiny config name")
    import torch

    if torch.cuda.is_available():
        return  # the hardware check below refuses a GPU run only where there is none
    code, err = run_main(sft_fit(tmp_path, sft, tokenizer_dir, "--trainer.accelerator=gpu"),
                         capsys)
    assert code == 2
    [line] = error_lines(err)
    assert line.startswith("error: trainer.accelerator='gpu' needs a CUDA GPU, and none is "
                           "visible") and "Fix: set trainer.accelerator=cpu" in line


def test_debug_environment_variable_lets_the_error_through(tmp_path, tokenizer_dir,
                                                          monkeypatch):
    monkeypatch.setenv(DEBUG_ENV, "1")
    bad = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "", "response": "1"}])
    with pytest.raises(DataFormatError, match="field 'prompt' is empty"):
        main(sft_fit(tmp_path, bad, tokenizer_dir))


def test_real_bugs_keep_their_traceback(tmp_path, task_data, tokenizer_dir, monkeypatch):
    import dvpo_lightning.commands.fit as fit

    def bug(config):
        raise RuntimeError("a bug")

    monkeypatch.setattr(fit, "check_rl_batch", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(sft_fit(tmp_path, str(Path(task_data) / "sft.jsonl"), tokenizer_dir))
    # a ValueError raised inside a library (not by one of our checks) is a bug too
    with pytest.raises(json.JSONDecodeError), reported_errors():
        json.loads("{")


@pytest.mark.parametrize("args,message", [
    (["explain", "--gvm", MISSING],
     "error: explain: no input: give either --prompt with --responses, or --file (neither was "
     "given). Fix: --prompt '6495028=' --responses 0224456889 0024868899, or --file "
     "data/sorting/eval_pairs.jsonl"),
    (["data", "--out", "{tmp}/data", "--responses_per_prompt", "1"],
     "error: responses_per_prompt=1 must be >= 2"),
    (["pipeline", "--data", "{tmp}/nope.yaml"],
     "error: command line: data: names no file (from {cwd}), got '{tmp}/nope.yaml'. fix the "
     "path; pipeline paths are relative to where it runs"),
])
def test_other_commands_report_one_line(args, message, tmp_path, capsys):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, err = run_main(args, capsys)
    assert code == 2 and "Traceback" not in err
    assert error_lines(err) == [message.replace("{tmp}", str(tmp_path)).replace(
        "{cwd}", str(Path.cwd()))]


def test_pipeline_stage_failure_is_one_line(tmp_path, tokenizer_dir, capsys):
    """A stage run as a subprocess prints its own error; the pipeline adds one line with the
    stage's command and exits with its status."""
    bad = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "1=", "chosen": "1", "rejected": "2"}])
    spec = {"stages": [{"name": "sft", "config": str(CONFIGS / "sft.yaml"),
                        "artifact": str(tmp_path / "model"),
                        "args": sft_fit(tmp_path, bad, tokenizer_dir)[3:]}],
            "skip_report": True}
    (tmp_path / "pipeline.yaml").write_text(json.dumps(spec))
    with pytest.raises(SystemExit) as e:
        main(["pipeline", "--config", str(tmp_path / "pipeline.yaml")])
    assert e.value.code == 2
    err = capsys.readouterr().err  # (the stage's own stderr went to the terminal)
    assert "Traceback" not in err
    [line] = error_lines(err)
    assert line.startswith(f"error: the command `{sys.executable} -m dvpo_lightning fit "
                           f"--config {CONFIGS / 'sft.yaml'}")
    assert line.endswith("failed with exit status 2 (its own error is printed above)")


def test_parse_errors_are_jsonargparse_s(capsys):
    code, err = run_main(["fit", "--config", str(CONFIGS / "sft.yaml"),
                          "--trainer.max_stepz=3"], capsys)
    assert code == 2
    assert "usage:" in err and "did you mean 'trainer.max_steps'?" in err


# --- data before models -------------------------------------------------------------------


def test_rl_prompt_file_is_read_before_the_policy(tmp_path, task_data, capsys):
    bad = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "12="}, {"prompt": ["12="]}])
    code, err = run_main(rl_fit("dvpo.yaml", task_data, tmp_path,
                                f"--data.init_args.train_path={bad}"), capsys)
    assert code == 2
    assert error_lines(err) == [
        f"error: {bad}, row 1 (line 2): field 'prompt[0]' must be a message object, found str "
        "('12='). Fix: write {\"role\": ..., \"content\": ...}"]


@pytest.mark.parametrize("config,extra,rollout,group,mini,fits", [
    ("grpo.yaml", ["--data.init_args.batch_size=3"], 12, 4, 32, [1, 2, 3, 4, 6, 12]),
    ("dvpo.yaml", ["--model.init_args.ppo.mini_batch_size=48"], 64, 1, 48,
     [1, 2, 4, 8, 16, 32, 64]),
])
def test_rollout_batch_is_checked_from_the_config(config, extra, rollout, group, mini, fits,
                                                  tmp_path, task_data, capsys):
    code, err = run_main(rl_fit(config, task_data, tmp_path, *extra), capsys)
    batch = rollout // group
    assert code == 2
    assert error_lines(err) == [
        f"error: the rollout batch ({rollout} responses = data.init_args.batch_size {batch} × the "
        f"estimator's group_size {group}) must be a multiple of "
        "model.init_args.ppo.mini_batch_size "
        f"({mini}). Fix: set model.init_args.ppo.mini_batch_size to one of {fits}, or change "
        "data.init_args.batch_size"]


def test_estimator_group_size_without_models():
    grpo = "dvpo_lightning.estimators.GRPO"
    assert estimator_group_size(Namespace(class_path=grpo, init_args=Namespace(group_size=3))) == 3
    assert estimator_group_size(Namespace(class_path=grpo, init_args=Namespace())) == 5
    assert estimator_group_size(Namespace(class_path=grpo)) == 5
    gvm = "dvpo_lightning.estimators.GVM"
    assert estimator_group_size(Namespace(class_path=gvm, init_args=Namespace())) == 1


def test_files_are_read_once(tmp_path, task_data, tokenizer_dir, monkeypatch):
    """The CLI's DataModule is the one whose files were checked; ``setup`` reuses them."""
    import dvpo_lightning.data.base as base

    reads = []
    real = base.load_examples

    def counting(path, *args, **kwargs):
        reads.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(base, "load_examples", counting)
    sft = str(Path(task_data) / "sft.jsonl")
    args = sft_fit(tmp_path, sft, tokenizer_dir, "--model.init_args.backbone=test-llama",
                   f"--model.init_args.export_dir={tmp_path / 'model'}")[1:]
    cli = cli_main(args, run=False)
    assert reads == [sft]
    assert cli.datamodule.train_set is not None
    assert cli.config_init["data"] is cli.datamodule
    cli.datamodule.setup("fit")
    assert reads == [sft]
    assert len(next(iter(cli.datamodule.train_dataloader()))["prompt_ids"]) == 64


# --- files written for another tokenizer, files of another kind -----------------------------


def test_text_of_another_tokenizer_is_refused(tmp_path, tokenizer_dir, capsys):
    english = write_jsonl(tmp_path / "english.jsonl", ENGLISH)
    code, err = run_main(sft_fit(tmp_path, english, tokenizer_dir,
                                 "--data.init_args.max_length=128"), capsys)
    total = sum(len(r["prompt"]) + len(r["response"]) + 1 for r in ENGLISH)  # chars + EOS
    unk = total - len(ENGLISH)
    assert code == 2
    assert error_lines(err) == [
        f"error: {english}: {unk} of its {total} tokens ({unk / total:.0%}) are the unknown "
        f"token '<unk>' of the tokenizer {tokenizer_dir} (more than 50% is refused). Fix: this "
        "data was written for another tokenizer; point data.init_args.tokenizer at the model's "
        "tokenizer, "
        "or use data written for this one"]


def test_scored_run_given_pairs_names_train_kind(tmp_path, task_data, tokenizer_dir, capsys):
    pairs = str(Path(task_data) / "pairs.jsonl")
    code, err = run_main(value_fit("gvm.yaml", tmp_path, pairs, task_data, tokenizer_dir),
                         capsys)
    assert code == 2
    [line] = error_lines(err)
    assert line.startswith(f"error: {pairs}, row 0 (line 1): field 'response' is missing")
    assert "this looks like a pairwise file (row 0 reads as 'pairwise' rows), not 'scored' " \
           "rows" in line
    assert line.endswith("Fix: set data.init_args.train_kind=pairwise to train on the pairs "
                         "(chosen → chosen_return, rejected → rejected_return; "
                         "configs/gvm_pairs.yaml)")


def test_sft_run_given_pairs_names_the_pairwise_datamodule(tmp_path, task_data, tokenizer_dir,
                                                          capsys):
    pairs = str(Path(task_data) / "pairs.jsonl")
    code, err = run_main(sft_fit(tmp_path, pairs, tokenizer_dir), capsys)
    assert code == 2
    [line] = error_lines(err)
    assert "this looks like a pairwise file" in line and "not 'sft' rows" in line
    assert line.endswith("Fix: pairs belong to PairwiseDataModule (configs/reward_model.yaml), "
                         "or to ValueDataModule with data.init_args.train_kind=pairwise "
                         "(configs/gvm_pairs.yaml)")


@pytest.mark.parametrize("config", ["gvm.yaml", "reward_model.yaml"])
def test_a_file_smaller_than_one_batch_is_one_error_before_models_load(config, tmp_path,
                                                                     task_data, tokenizer_dir,
                                                                     capsys):
    # A stage counted in epochs (the GVM, the reward model) on a user's small file with the
    # shipped batch (64 / 32): refused before the (missing) backbone loads, naming the fix.
    kind = "trajectories" if config == "gvm.yaml" else "pairs"
    rows = Path(task_data, f"{kind}.jsonl").read_text().splitlines()[:5]
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(rows) + "\n")
    code, err = run_main(value_fit(config, tmp_path, small, task_data, tokenizer_dir), capsys)
    assert code == 2
    [line] = error_lines(err)
    rows, batch = 5, (64 if config == "gvm.yaml" else 32)
    assert line == (f"error: data.init_args.train_path={small} gives {rows} training rows, "
                    f"fewer than data.init_args.batch_size={batch}, so not one optimizer step can "
                    "be "
                    f"formed. Fix: set --data.init_args.batch_size={rows} (or less), or add rows")
