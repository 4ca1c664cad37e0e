"""A stage run inside this process gets its own command line: LightningCLI sees the stage's
arguments, not the outer command's, and so prints no "args and command line arguments"
warning (the in-process pipeline printed it for every stage)."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest
from lightning.pytorch import Callback

from dvpo_lightning.commands.pipeline import run_pipeline

REPO = Path(__file__).resolve().parents[1]
ART = "runs/sorting/sft/model"


class RecordArgv(Callback):
    """Records ``sys.argv`` as the stage's Trainer starts fitting."""

    seen: list[list[str]] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        RecordArgv.seen.append(list(sys.argv))


@pytest.fixture
def workdir(task_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("data")
    os.symlink(task_data, "data/sorting")  # the config's relative paths
    return tmp_path


def test_in_process_stage_warns_nothing_about_its_arguments(workdir, monkeypatch, capfd):
    """The outer command (``python -m dvpo_lightning pipeline --config …``) has arguments of
    its own in ``sys.argv``; an in-process stage must neither warn about them nor keep them."""
    outer = [sys.argv[0], "pipeline", "--config", "study.yaml", "--in_process", "true"]
    monkeypatch.setattr(sys, "argv", list(outer))
    stage = {"name": "sft", "config": str(REPO / "configs" / "sft.yaml"), "artifact": ART,
             "args": ["--model.init_args.backbone=test-llama",
                      "--model.init_args.optim.warmup_steps=0",
                      "--data.init_args.batch_size=8", "--trainer.max_steps=1",
                      "--trainer.limit_val_batches=0", "--trainer.logger=false",
                      "--trainer.enable_progress_bar=false",
                      "--trainer.enable_model_summary=false",
                      "--trainer.callbacks+=test_stage_cli_warnings.RecordArgv"]}
    RecordArgv.seen.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = run_pipeline(stages=[stage], in_process=True)
    assert report["sft"]["status"] == "ran"
    noise = [str(w.message) for w in caught if "command line arguments" in str(w.message)]
    assert noise == []
    assert "command line arguments" not in "".join(capfd.readouterr())
    # during the stage the process's command line is the stage's, as in a subprocess (a DDP
    # launcher re-runs sys.argv: it must start the stage, not the whole pipeline again)
    assert len(RecordArgv.seen) == 1
    assert RecordArgv.seen[0][1:3] == ["fit", "--config"]
    assert RecordArgv.seen[0][-1] == "--trainer.callbacks+=test_stage_cli_warnings.RecordArgv"
    assert sys.argv == outer  # the outer command's own arguments are back


def test_the_outer_command_line_is_restored_after_a_stage_that_fails(monkeypatch):
    """A stage whose arguments LightningCLI refuses still hands ``sys.argv`` back."""
    from dvpo_lightning.commands.fit import cli_main

    outer = [sys.argv[0], "pipeline", "--config", "study.yaml"]
    monkeypatch.setattr(sys, "argv", list(outer))
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(REPO / "configs" / "sft.yaml"), "--no_such_key=1"],
                 run=False)
    assert sys.argv == outer
