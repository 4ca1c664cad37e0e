"""Exact resume: N steps == N/2 steps + resume from ``last.ckpt`` + N/2 steps, on CPU.

For every RL estimator (through the real CLI and configs), for SFT and for the GVM: the final
weights are bit-for-bit equal, and for RL so are the evaluation history and the per-step
rollout curve (gold reward, KL, scores), which depend on the restored RNG states, prompt
order and position, KL controller and optimizer state. One case resumes exactly at the end of
an epoch of the prompt set. A resume against a different GVM is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import build_trainer
from test_rl_training import make_cli

from dvpo_lightning.commands.fit import make_resumable

CHECKPOINTING = ["--trainer.enable_checkpointing=true"]


def _rl(name, root, artifacts, task_data, rl_steps, val_every, *extra, batch_size=2):
    cli, max_steps = make_cli(name, root, artifacts, task_data, *CHECKPOINTING,
                              f"--trainer.val_check_interval={val_every}", *extra,
                              rl_steps=rl_steps, batch_size=batch_size)
    return cli, max_steps


def _trained(cli) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in cli.model.trained.state_dict().items()}


def _curve(root: Path) -> tuple[list, list]:
    s = json.loads((root / "summary.json").read_text())
    curve = [{k: v for k, v in row.items() if not k.endswith("_s")} for row in s["train_curve"]]
    return s["history"], curve


def run_three_ways(name, tmp_path, artifacts, task_data, rl_steps, val_every, *extra,
                   batch_size=2):
    """Full run; half run; resume of the half run. Returns the three (weights, summary)."""
    out = {}
    full, _ = _rl(name, tmp_path / "full", artifacts, task_data, rl_steps, val_every, *extra,
                  batch_size=batch_size)
    full.trainer.fit(full.model, full.datamodule)
    out["full"] = (_trained(full), _curve(tmp_path / "full"), full.model.kl.coef)
    half_steps = rl_steps // 2
    half, _ = _rl(name, tmp_path / "half", artifacts, task_data, half_steps, val_every, *extra,
                  batch_size=batch_size)
    half.trainer.fit(half.model, half.datamodule)
    last = tmp_path / "half" / "checkpoints" / "last.ckpt"
    assert last.exists(), sorted(p.name for p in (tmp_path / "half").rglob("*.ckpt"))
    ckpt = torch.load(last, weights_only=True)  # what Lightning's own load accepts
    assert ckpt["global_step"] == half_steps  # RL steps
    # the prompt cursor counts the prompts trained on, not ones fetched ahead
    assert ckpt["RolloutDataModule"]["sampler"] == {"epoch": 0,
                                                    "position": half_steps * batch_size}
    resumed, _ = _rl(name, tmp_path / "half", artifacts, task_data, rl_steps, val_every, *extra,
                     batch_size=batch_size)
    resumed.trainer.fit(resumed.model, resumed.datamodule, ckpt_path=str(last))
    out["resumed"] = (_trained(resumed), _curve(tmp_path / "half"), resumed.model.kl.coef)
    return out


def assert_same(out) -> None:
    (w_full, (h_full, c_full), kl_full), (w_res, (h_res, c_res), kl_res) = (out["full"],
                                                                          out["resumed"])
    assert w_full.keys() == w_res.keys()
    for k in w_full:
        assert torch.equal(w_full[k], w_res[k]), f"{k} differs after resume"
    assert h_res == h_full
    assert c_res == c_full
    assert kl_res == kl_full


LORA = ["--model.init_args.models.lora.r=4", "--model.init_args.optim.lr=1e-2"]


@pytest.mark.parametrize("name,extra", [
    ("dvpo", []), ("ppo", []), ("grpo", []), ("remax", []), ("rloo", []),
    # LoRA policy (reference = adapters off) and LoRA critic
    ("dvpo", LORA), ("ppo", [*LORA, "--model.init_args.models.critic_lora.r=4"])],
    ids=["dvpo", "ppo", "grpo", "remax", "rloo", "dvpo-lora", "ppo-lora"])
def test_rl_resume_is_exact(name, extra, tmp_path, artifacts, task_data):
    out = run_three_ways(name, tmp_path, artifacts, task_data, 4, 2,
                         "--model.init_args.kl.adaptive=true", *extra)
    assert_same(out)
    assert len(out["full"][1][1]) == 4  # four rollout rows, two before and two after
    if extra:  # LoRA: the checkpoint holds the adapters, not the base weights it reloads
        assert any("lora_" in k for k in out["full"][0])
        saved = torch.load(tmp_path / "half/checkpoints/last.ckpt", weights_only=True)
        keys = [k for k in saved["state_dict"] if k.startswith("trained.policy.")]
        assert keys and [k for k in keys if "lora_" not in k and "rotary" not in k] == []


def test_rl_resume_at_an_epoch_boundary(tmp_path, artifacts, task_data):
    """64 prompts in batches of 16: RL step 4 ends the first epoch; the resumed run must start
    the second epoch's order, not replay or skip prompts."""
    out = run_three_ways("dvpo", tmp_path, artifacts, task_data, 8, 4, batch_size=16)
    assert_same(out)


def test_resume_against_a_different_gvm_is_refused(tmp_path, artifacts, task_data):
    half, _ = _rl("dvpo", tmp_path, artifacts, task_data, 1, 1)
    half.trainer.fit(half.model, half.datamodule)
    other = tmp_path / "other_gvm"
    import shutil

    shutil.copytree(artifacts.gvm, other)
    head = other / "value_head.safetensors"
    from safetensors.torch import load_file, save_file

    w = load_file(str(head))
    save_file({k: v + 1 for k, v in w.items()}, str(head))
    resumed, _ = _rl("dvpo", tmp_path, artifacts, task_data, 2, 1,
                     f"--model.init_args.value_model={other}")
    with pytest.raises(ValueError, match="resume refused: the checkpoint was trained with gvm"):
        resumed.trainer.fit(resumed.model, resumed.datamodule,
                            ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))


# --- stage 1 -------------------------------------------------------------------------------

class StopAt(L.Callback):
    """Stop after ``step`` optimizer steps, as a crash would, without changing ``max_steps``
    (the learning-rate schedule depends on it)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _stage1(kind, root, task_data, tokenizer_dir, sft_model_dir, max_steps, stop_at=None):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from dvpo_lightning.data.sft import SFTDataModule
    from dvpo_lightning.data.value import ValueDataModule
    from dvpo_lightning.models.options import LoadOptions
    from dvpo_lightning.modules import GVMModule, OptimSettings, SFTModule

    L.seed_everything(0, verbose=False)
    if kind == "sft":
        module = SFTModule(backbone="test-llama", tokenizer=tokenizer_dir,
                           optim=OptimSettings(lr=1e-2, warmup_steps=2))
        data = SFTDataModule(train_path=f"{task_data}/sft.jsonl", tokenizer=tokenizer_dir,
                             batch_size=64, max_length=32)
    else:
        from dvpo_lightning.models.lora import LoraOptions

        module = GVMModule(backbone=sft_model_dir, tokenizer=tokenizer_dir,
                           optim=OptimSettings(lr=1e-3, warmup_steps=2),
                           models=LoadOptions(lora=LoraOptions(r=4) if kind == "gvm-lora"
                                              else None))
        data = ValueDataModule(train_path=f"{task_data}/trajectories.jsonl", train_kind="scored",
                               val_path=f"{task_data}/eval_pairs.jsonl",
                               tokenizer=tokenizer_dir, batch_size=64, max_length=32)
    ckpt = ModelCheckpoint(every_n_train_steps=3, save_last=True)
    trainer = build_trainer(root, max_steps=max_steps, enable_checkpointing=True,
                            callbacks=[ckpt] + ([StopAt(stop_at)] if stop_at else []))
    make_resumable(trainer)
    return module, data, trainer


@pytest.mark.parametrize("kind", ["sft", "gvm", "gvm-lora"])
def test_stage1_resume_is_exact(kind, tmp_path, task_data, tokenizer_dir, sft_model_dir):
    """400 SFT rows in batches of 64 (6 per epoch): 12 steps cross an epoch; stop at 6 (the
    epoch's end for SFT) and resume."""
    full = _stage1(kind, tmp_path / "full", task_data, tokenizer_dir, sft_model_dir, 12)
    full[2].fit(full[0], full[1])
    half = _stage1(kind, tmp_path / "half", task_data, tokenizer_dir, sft_model_dir, 12,
                   stop_at=6)
    half[2].fit(half[0], half[1])
    assert half[2].global_step == 6
    resumed = _stage1(kind, tmp_path / "half", task_data, tokenizer_dir, sft_model_dir, 12)
    resumed[2].fit(resumed[0], resumed[1],
                   ckpt_path=str(tmp_path / "half" / "checkpoints" / "last.ckpt"))
    a, b = full[0].model.state_dict(), resumed[0].model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{kind}: {k} differs after resume"
    if kind == "gvm-lora":  # the checkpoint holds the adapters and the head only
        saved = torch.load(tmp_path / "half/checkpoints/last.ckpt", weights_only=True)
        assert any("lora_" in k for k in saved["state_dict"])
        assert [k for k in saved["state_dict"] if "lora_" not in k and "rotary" not in k
                and not k.startswith("model.head.")] == []
