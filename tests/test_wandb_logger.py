"""W&B logging by default: offline without an API key, the resolved config in the run, metrics in
its history, ``--trainer.logger=false`` still turns it off. Nothing here contacts a network."""

from __future__ import annotations

import glob
import json
import logging
import math
import os
from pathlib import Path

import pytest
import wandb
from wandb_offline import read_offline_run

from dvpo_lightning.commands.fit import cli_main
from dvpo_lightning.runtime.loggers import AutoWandbLogger, auto_mode

REPO = Path(__file__).resolve().parents[1]
SFT_YAML = str(REPO / "configs" / "sft.yaml")


@pytest.fixture()
def no_credentials(monkeypatch, tmp_path):
    """No API key anywhere and no WANDB_MODE: the logger must decide offline by itself."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))


@pytest.fixture()
def sft_workdir(task_data, tmp_path, monkeypatch) -> Path:
    """A working directory where ``configs/sft.yaml``'s relative ``data/sorting`` paths (the
    GoldEval callback's prompts too) resolve to the tiny task data."""
    (tmp_path / "data").mkdir()
    os.symlink(task_data, tmp_path / "data" / "sorting")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_auto_mode_without_key_or_server(no_credentials, monkeypatch):
    mode, why = auto_mode()
    assert mode == "offline" and "API key" in why
    # a key but an unreachable server (a closed local port: no traffic leaves the machine)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    mode, why = auto_mode()
    assert mode == "offline" and "not reachable" in why
    monkeypatch.setenv("WANDB_MODE", "disabled")  # an explicit mode always wins
    assert auto_mode()[0] == "disabled"


def test_default_logger_and_logger_false(sft_workdir, tmp_path):
    root = tmp_path / "root"
    base = ["--config", SFT_YAML, "--model.init_args.backbone=test-llama",
            f"--trainer.default_root_dir={root}"]
    cli = cli_main(args=base, run=False)
    assert isinstance(cli.trainer.logger, AutoWandbLogger)
    assert cli.trainer.logger.save_dir == str(root)  # the run goes under default_root_dir
    assert cli.trainer.log_dir == str(root)  # where config.yaml and summaries are written
    cli = cli_main(args=[*base, "--trainer.logger=false"], run=False)
    assert cli.trainer.logger is None


def test_offline_fit_logs_config_and_metrics(no_credentials, sft_workdir, caplog):
    root = sft_workdir / "run"
    args = ["fit", "--config", SFT_YAML, "--model.init_args.backbone=test-llama",
            "--model.init_args.optim.lr=0.0123", "--model.init_args.optim.warmup_steps=0",
            f"--model.init_args.export_dir={root / 'model'}", f"--trainer.default_root_dir={root}",
            "--trainer.max_steps=4", "--trainer.val_check_interval=2",
            "--trainer.check_val_every_n_epoch=null", "--trainer.limit_val_batches=1",
            "--trainer.log_every_n_steps=1", "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu",
            "--data.init_args.batch_size=16", "--trainer.callbacks.init_args.max_prompts=4",
            "--trainer.logger.init_args.group=test-group",
            "--trainer.logger.init_args.tags=[sft,tiny]"]
    with caplog.at_level(logging.INFO):
        try:
            cli_main(args=args)
        finally:
            wandb.finish()
            wandb.teardown()  # stop this process's wandb-core: later subprocesses must not share it
    runs = glob.glob(str(root / "wandb" / "offline-run-*"))
    assert len(runs) == 1, runs
    assert f"wandb sync {runs[0]}" in caplog.text  # the hint, with the run's directory

    run = read_offline_run(runs[0])
    assert run["group"] == "test-group"
    cfg = run["config"]  # the full resolved LightningCLI config, nested as in the YAML
    assert cfg["model"]["class_path"] == "dvpo_lightning.modules.SFTModule"
    assert cfg["model"]["init_args"]["optim"]["lr"] == 0.0123
    assert cfg["model"]["init_args"]["optim"]["min_lr_ratio"] == 0.1  # a default, never on the CLI
    assert cfg["trainer"]["max_steps"] == 4
    assert cfg["data"]["init_args"]["batch_size"] == 16
    assert cfg["data"]["init_args"]["tokenizer"] == "data/sorting/tokenizer"

    losses = [row["train/loss"] for row in run["history"] if "train/loss" in row]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    evals = [row for row in run["history"] if "val/loss" in row]
    assert len(evals) == 2 and "eval/gold_reward" in evals[-1]
    assert (root / "config.yaml").is_file()  # Lightning's own copy is still written


def test_pair_accuracy_table_reaches_the_wandb_run(task_data, tokenizer_dir, tmp_path):
    """The stage-1 evaluation table is logged to W&B (as a table), not only printed."""
    import lightning as L

    from dvpo_lightning.data.pairwise import PairwiseDataModule
    from dvpo_lightning.modules import RewardModelModule

    logger = AutoWandbLogger(offline=True, save_dir=str(tmp_path))
    dm = PairwiseDataModule(train_path=f"{task_data}/pairs.jsonl",
                            val_path=f"{task_data}/eval_pairs.jsonl", tokenizer=tokenizer_dir,
                            batch_size=8, max_length=32)
    module = RewardModelModule(backbone="test-llama", tokenizer=tokenizer_dir)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=2, logger=logger,
                        val_check_interval=2, check_val_every_n_epoch=None,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=str(tmp_path))
    try:
        trainer.fit(module, datamodule=dm)
    finally:
        wandb.finish()
        wandb.teardown()
    (run_dir,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    rows = [r for r in read_offline_run(run_dir)["history"]
            if "eval/pair_accuracy/_type" in r]  # the reader flattens nested keys
    assert len(rows) == 1 and rows[0]["eval/pair_accuracy/_type"] == "table-file"
    assert rows[0]["eval/pair_accuracy/nrows"] == len(module.last_accuracy) == 8
    assert rows[0]["eval/pair_accuracy/ncols"] == 2
    # and the token-value picture of the first held-out pairs (PNG and HTML)
    types = {k: v for r in read_offline_run(run_dir)["history"] for k, v in r.items()
             if k.endswith("/_type")}
    assert types["eval/token_values/_type"] == "image-file"
    assert types["eval/token_values_html/_type"] == "html-file"


def test_rl_learning_curves_reach_the_wandb_run(artifacts, task_data, tmp_path):
    """An RL fit logs its evaluation history as a table and its learning curves as a picture."""
    from test_rl_training import make_cli

    logger = '{"class_path": "dvpo_lightning.runtime.loggers.AutoWandbLogger", "init_args": ' \
             '{"offline": true}}'
    cli, _ = make_cli("dvpo", tmp_path, artifacts, task_data, f"--trainer.logger={logger}",
                      rl_steps=2)
    try:
        cli.trainer.fit(cli.model, cli.datamodule)
    finally:
        wandb.finish()
        wandb.teardown()
    (run_dir,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    types = {k: v for r in read_offline_run(run_dir)["history"] for k, v in r.items()
             if k.endswith("/_type")}
    assert types["eval/learning_curves/_type"] == "image-file"
    assert types["eval/history/_type"] == "table-file"


def test_a_run_without_a_judge_exports_and_draws_the_curves_it_has(artifacts, task_data,
                                                                    tmp_path):
    """Prompts no built-in task judges (``judge: null``): the run ends with its model exported
    and its learning curves drawn from the measures it has (no gold reward, no win rate),
    instead of failing in the picture after training (issue 24)."""
    from test_rl_training import make_cli
    from transformers import AutoModelForCausalLM

    logger = '{"class_path": "dvpo_lightning.runtime.loggers.AutoWandbLogger", "init_args": ' \
             '{"offline": true}}'
    cli, _ = make_cli("dvpo", tmp_path, artifacts, task_data, f"--trainer.logger={logger}",
                      "--model.init_args.judge=null", rl_steps=2)
    try:
        cli.trainer.fit(cli.model, cli.datamodule)
    finally:
        wandb.finish()
        wandb.teardown()
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "policy"))
    summary = json.loads(next(tmp_path.rglob("summary.json")).read_text())
    first, final = summary["history"][0], summary["final_eval"]
    assert first["rl_step"] == 0 and first["eval/kl_to_ref"] == 0.0  # the reference itself
    for row in (first, final):  # what can be measured without a judge, named as what it is
        assert {"eval/kl_to_ref", "eval/response_len", "eval/gvm_value"} <= set(row)
        assert not {"eval/gold_reward", "eval/win_rate_vs_ref", "eval/exact"} & set(row)
    (run_dir,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    types = {k: v for r in read_offline_run(run_dir)["history"] for k, v in r.items()
             if k.endswith("/_type")}
    assert types["eval/learning_curves/_type"] == "image-file"


def test_a_picture_that_fails_never_costs_the_model(artifacts, task_data, tmp_path,
                                                     monkeypatch):
    """The export runs before the summary's tables and pictures, and a failure there is a
    warning: the model and summary.json are written, and fit returns."""
    from test_rl_training import make_cli

    from dvpo_lightning.modules.dvpo import DVPOModule

    def broken(self, log_dir, summary):
        raise RuntimeError("no picture today")

    monkeypatch.setattr(DVPOModule, "summary_pictures", broken)
    logger = '{"class_path": "dvpo_lightning.runtime.loggers.AutoWandbLogger", "init_args": ' \
             '{"offline": true}}'
    cli, _ = make_cli("dvpo", tmp_path, artifacts, task_data, f"--trainer.logger={logger}",
                      rl_steps=1)
    try:
        with pytest.warns(UserWarning, match="no picture today"):
            cli.trainer.fit(cli.model, cli.datamodule)
    finally:
        wandb.finish()
        wandb.teardown()
    assert (tmp_path / "policy" / "dvpo_artifact.json").exists()
    assert list(tmp_path.rglob("summary.json"))


def test_a_run_after_a_change_of_directory_writes_its_log_in_its_own_folder(tmp_path,
                                                                            monkeypatch):
    """W&B's service outlives a run and resolves relative paths against its own working
    directory; the logger hands it an absolute run folder, so a second run started from
    another directory (pipeline stages in one process, tests) keeps its log."""
    import wandb

    from dvpo_lightning.runtime.loggers import AutoWandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        logger = AutoWandbLogger(project="t")
        logger.use_save_dir("runs")
        logger.experiment.log({"x": 1})
        wandb.finish()
        assert list((tmp_path / name / "runs/wandb").glob("offline-run-*/*.wandb")), name
