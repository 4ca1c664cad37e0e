"""An interrupted pipeline stage resumes from its own ``last.ckpt`` on the next run, and only
from a checkpoint the same stage wrote."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from dvpo_lightning.commands.pipeline import run_pipeline
from dvpo_lightning.modules.sft import SFTModule

REPO = Path(__file__).resolve().parents[1]
ART = "runs/sorting/sft/model"
CKPT = Path("runs/sorting/sft/checkpoints/last.ckpt")
TRAINING_STEP = SFTModule.training_step


class Crash(RuntimeError):
    pass


def _stage(max_steps: int = 6) -> dict:
    return {"name": "sft", "config": str(REPO / "configs" / "sft.yaml"), "artifact": ART,
            "args": ["--model.init_args.backbone=test-llama",
                     "--model.init_args.optim.warmup_steps=0",
                     "--data.init_args.batch_size=8", f"--trainer.max_steps={max_steps}",
                     "--trainer.max_epochs=20", "--trainer.val_check_interval=2",
                     "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                     "--trainer.enable_model_summary=false"]}


@pytest.fixture
def workdir(task_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("data")
    os.symlink(task_data, "data/sorting")  # the config's relative paths
    return tmp_path


def _record_steps(monkeypatch, crash_at: int | None) -> list[int]:
    """Patch the SFT step to record each global step it runs, raising at ``crash_at``."""
    seen: list[int] = []

    def step(self, batch, batch_idx):
        if self.global_step == crash_at:
            raise Crash(f"simulated crash at step {crash_at}")
        seen.append(self.global_step)
        return TRAINING_STEP(self, batch, batch_idx)

    monkeypatch.setattr(SFTModule, "training_step", step)
    return seen


def test_interrupted_stage_resumes_from_its_last_checkpoint(workdir, monkeypatch, capsys):
    first = _record_steps(monkeypatch, crash_at=5)
    with pytest.raises(Crash):
        run_pipeline(stages=[_stage()], in_process=True)
    assert first == [0, 1, 2, 3, 4]
    marker = Path(f"{ART}.started.json")
    assert marker.exists() and CKPT.exists() and not Path(ART).exists()
    saved_at = torch.load(CKPT, weights_only=False)["global_step"]
    assert saved_at == 4  # saved after the validation at step 4

    again = _record_steps(monkeypatch, crash_at=None)
    report = run_pipeline(stages=[_stage()], in_process=True)
    assert report["sft"]["status"] == "resumed"
    assert "resuming the interrupted run" in capsys.readouterr().out
    assert again == [4, 5]  # only the steps the crash lost
    assert Path(ART).exists() and not marker.exists()
    assert run_pipeline(stages=[_stage()], in_process=True)["sft"]["status"] == "reused"


def test_a_changed_stage_does_not_resume_another_configs_checkpoint(workdir, monkeypatch):
    _record_steps(monkeypatch, crash_at=3)
    with pytest.raises(Crash):
        run_pipeline(stages=[_stage(max_steps=6)], in_process=True)
    assert CKPT.exists()
    seen = _record_steps(monkeypatch, crash_at=None)
    report = run_pipeline(stages=[_stage(max_steps=4)], in_process=True)  # another stage hash
    assert report["sft"]["status"] == "ran"
    assert seen == [0, 1, 2, 3]  # from scratch
    stamped = json.loads(Path(ART, "pipeline_stage.json").read_text())["args"]
    assert stamped[-len(_stage(4)["args"]):] == _stage(4)["args"]  # after its own directories


def test_force_starts_an_interrupted_stage_afresh(workdir, monkeypatch):
    _record_steps(monkeypatch, crash_at=3)
    with pytest.raises(Crash):
        run_pipeline(stages=[_stage()], in_process=True)
    seen = _record_steps(monkeypatch, crash_at=None)
    assert run_pipeline(stages=[_stage()], in_process=True, force=True)["sft"]["status"] == "ran"
    assert seen[0] == 0


def test_resumes_from_lightnings_versioned_last_checkpoint(workdir, monkeypatch):
    """A ``last.ckpt`` older than the attempt (another run's) makes Lightning write
    ``last-v1.ckpt``; the rerun resumes from that one, not from the stale file."""
    CKPT.parent.mkdir(parents=True)
    CKPT.write_bytes(b"not a checkpoint of this run")
    os.utime(CKPT, (1, 1))
    _record_steps(monkeypatch, crash_at=3)
    with pytest.raises(Crash):
        run_pipeline(stages=[_stage()], in_process=True)
    assert (CKPT.parent / "last-v1.ckpt").exists()
    seen = _record_steps(monkeypatch, crash_at=None)
    assert run_pipeline(stages=[_stage()], in_process=True)["sft"]["status"] == "resumed"
    assert seen == [2, 3, 4, 5]


def test_stages_in_one_process_log_to_their_own_wandb_runs(workdir, monkeypatch):
    """In one process (``in_process``), each stage is its own W&B run, not the first's."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    stages = []
    for name in ("sft_a", "sft_b"):
        stage = _stage(max_steps=2)
        stage["args"] = [a for a in stage["args"] if a != "--trainer.logger=false"]
        stages.append({**stage, "name": name, "artifact": f"runs/{name}/model"})
    run_pipeline(stages=stages, in_process=True)
    for name in ("sft_a", "sft_b"):
        runs = list(Path(f"runs/{name}/wandb").glob("offline-run-*"))
        assert len(runs) == 1, name
        assert list(runs[0].glob("*.wandb")), name  # the run's own log was written
