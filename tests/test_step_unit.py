"""RL steps are one unit whatever the prompt file's length: evaluation intervals count them
across passes over the file, the progress bar counts them out of ``max_steps``, and a setting
the files cannot satisfy is one error before any model loads (issue 24, item 3)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_rl_training import make_cli

from dvpo_lightning.runtime.step_unit import StepProgressBar


def short_prompt_file(task_data: str, tmp_path: Path, n: int) -> str:
    rows = Path(task_data, "rl_prompts.jsonl").read_text().splitlines()[:n]
    out = tmp_path / "few_prompts.jsonl"
    out.write_text("\n".join(rows) + "\n")
    return str(out)


def test_evaluation_counts_rl_steps_across_passes_over_a_short_prompt_file(
        artifacts, task_data, tmp_path):
    """3 prompts at 2 per step: one RL step per pass. An evaluation every 2 RL steps over 4
    steps evaluates at steps 2 and 4 (Lightning alone refuses an interval over 1 here), and
    the progress bar reads RL steps out of max_steps."""
    prompts = short_prompt_file(task_data, tmp_path, 3)
    cli, _ = make_cli("dvpo", tmp_path, artifacts, task_data,
                      f"--data.init_args.train_path={prompts}", "--trainer.max_steps=4",
                      "--trainer.val_check_interval=2",
                      "--trainer.enable_progress_bar=true", rl_steps=4)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 4 and cli.trainer.current_epoch >= 3
    assert [row["rl_step"] for row in cli.model.evals.rows] == [0, 2, 4]
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, StepProgressBar)
    task = bar.progress.tasks[bar.train_progress_bar_id]
    assert (task.description.strip(), task.total, task.completed) == ("RL step", 4, 4)


@pytest.mark.parametrize("extra, message", [
    (["--data.init_args.batch_size=4"],
     r"gives 3 prompts, fewer than data.init_args.batch_size=4, so not one RL step"),
    (["--trainer.val_check_interval=5", "--trainer.max_steps=3"],
     r"trainer.val_check_interval=5 RL steps is past trainer.max_steps=3"),
])
def test_a_setting_the_files_cannot_satisfy_is_one_error_before_models_load(
        artifacts, task_data, tmp_path, extra, message, monkeypatch):
    import dvpo_lightning.modules.dvpo as dvpo

    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(dvpo, "load_rl_models", no_models)
    prompts = short_prompt_file(task_data, tmp_path, 3)
    with pytest.raises(ValueError, match=message):
        make_cli("dvpo", tmp_path, artifacts, task_data,
                 f"--data.init_args.train_path={prompts}", *extra)


def test_the_study_configs_evaluate_as_before(artifacts, task_data, tmp_path):
    """A long prompt file: the same evaluation steps as Lightning's own counting gave."""
    cli, _ = make_cli("dvpo", tmp_path, artifacts, task_data, rl_steps=2)
    assert cli.trainer.check_val_every_n_epoch is None and cli.trainer.val_check_interval == 2
    assert json.dumps(cli.trainer.max_steps) == "2"
