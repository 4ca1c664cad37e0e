"""A real RL run killed mid-way (SIGKILL: a crash; SIGTERM: a preemption) resumes from
``last.ckpt`` and ends with the same weights as a run never interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dvpo_lightning.commands.fit import cli_main

REPO = Path(__file__).resolve().parents[1]
RL_STEPS = 8


def rl_args(root: Path, art, task_data: str) -> list[str]:
    """``configs/dvpo.yaml`` at a tiny size: 8 RL steps of 4 responses, one evaluation and one
    checkpoint after every RL step."""
    return ["--config", str(REPO / "configs" / "dvpo.yaml"),
            f"--model.init_args.policy={art.policy}", f"--model.init_args.value_model={art.gvm}",
            f"--data.init_args.train_path={task_data}/rl_prompts.jsonl",
            f"--data.init_args.eval_path={task_data}/eval_prompts.jsonl",
            "--data.init_args.test_path=null",  # (the config's names the study's test file)
            f"--data.init_args.tokenizer={task_data}/tokenizer",
            "--data.init_args.batch_size=4", "--data.init_args.max_eval_prompts=4",
            "--model.init_args.ppo.epochs=1", "--model.init_args.ppo.mini_batch_size=4",
            "--model.init_args.rollout.max_new_tokens=8",
            f"--model.init_args.export_dir={root}/policy",
            f"--trainer.default_root_dir={root}", f"--trainer.max_steps={RL_STEPS}",
            "--trainer.val_check_interval=1", "--trainer.logger=false",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def _env() -> dict:
    # This checkout first; the rest of PYTHONPATH stays (the GPU route's carried wheels live there).
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def _ckpt_step(path: Path) -> int:
    try:
        return torch.load(path, weights_only=True)["global_step"]  # RL steps
    except (FileNotFoundError, RuntimeError, EOFError, KeyError):
        return 0


def kill_when_checkpointed(args: list[str], last: Path, at_step: int, sig: int,
                           timeout: float = 240) -> tuple[int, str]:
    """Start ``fit`` in a subprocess; send ``sig`` once ``last`` holds RL step ≥ ``at_step``."""
    proc = subprocess.Popen([sys.executable, "-m", "dvpo_lightning", "fit", *args], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if last.exists() and _ckpt_step(last) >= at_step:
            proc.send_signal(sig)
            break
        time.sleep(0.02)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


@pytest.fixture(scope="module")
def uninterrupted(artifacts, task_data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("uninterrupted")
    torch.set_num_threads(1)
    cli_main(["fit", *rl_args(root, artifacts, task_data)])
    return load_file(str(root / "policy" / "model.safetensors"))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_run_resumes_to_the_same_weights(sig, uninterrupted, artifacts, task_data,
                                                tmp_path):
    args = rl_args(tmp_path, artifacts, task_data)
    last = tmp_path / "checkpoints" / "last.ckpt"
    code, out = kill_when_checkpointed(args, last, 2, sig)
    assert not (tmp_path / "policy").exists(), "the run finished before it was killed"
    step = _ckpt_step(last)
    assert 2 <= step < RL_STEPS, out[-3000:]
    if sig == signal.SIGTERM:
        assert "SIGTERM: checkpoint of step" in out, out[-3000:]
    else:
        assert code == -signal.SIGKILL
    res = subprocess.run([sys.executable, "-m", "dvpo_lightning", "fit", *args,
                          "--ckpt_path=last"], env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    resumed = load_file(str(tmp_path / "policy" / "model.safetensors"))
    for k, v in uninterrupted.items():
        assert torch.equal(v, resumed[k]), f"{k} differs (killed at RL step {step})"
