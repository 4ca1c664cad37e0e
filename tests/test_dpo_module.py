"""DPO as a stage through the real Lightning ``Trainer`` on the tiny task data, from the tiny
SFT policy.

Checked: every trainable parameter changes while the reference (a frozen copy, or with LoRA
the policy's base weights) stays bit-for-bit; the implicit-reward margin on the training pairs
grows from 0; validation records the held-out pair metrics and the RL runs' held-out
evaluation, the starting policy as step 0; the export loads as a policy and the study report
reads it as it reads an RL run; N steps == N/2 + resume + N/2, bit for bit, with the same
evaluation history; the settings the module cannot honour are refused.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import build_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from test_resume import StopAt
from test_stage1_training import assert_parameters_moved, head_file, snapshot
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from dvpo_lightning.commands.fit import make_resumable
from dvpo_lightning.data.collate import join
from dvpo_lightning.data.dpo import DPODataModule
from dvpo_lightning.models import load_tokenizer, position_ids_from_mask
from dvpo_lightning.models.compat import check_compatible
from dvpo_lightning.models.frozen_dtype import bf16_kernels
from dvpo_lightning.models.lora import LoraOptions
from dvpo_lightning.models.options import ModelOptions
from dvpo_lightning.modules import DPOModule, DPOSettings, OptimSettings
from dvpo_lightning.modules.dpo import check_dpo_options
from dvpo_lightning.report.runs import load_runs
from dvpo_lightning.rollout.settings import RolloutSettings
from dvpo_lightning.runtime.artifacts import ARTIFACT_FILE

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# the RL runs' held-out evaluation measures (the sorting task has a gold scorer)
EVAL_KEYS = {"rl_step", "eval/response_len", "eval/eos_frac", "eval/kl_to_ref",
             "eval/gold_reward", "eval/exact", "eval/win_rate_vs_ref"}
PAIR_KEYS = {"rl_step", "val/loss", "val/rewards/chosen", "val/rewards/rejected",
             "val/rewards/margins", "val/rewards/accuracies", "val/logps/chosen",
             "val/logps/rejected"}


def make_data(task_data: str, tokenizer_dir: str, train: str, batch_size: int) -> DPODataModule:
    return DPODataModule(train_path=train, val_path=f"{task_data}/eval_pairs.jsonl",
                         tokenizer=tokenizer_dir, eval_path=f"{task_data}/eval_prompts.jsonl",
                         max_eval_prompts=8, batch_size=batch_size, val_batch_size=64,
                         max_length=32)


def make_module(sft_model_dir: str, tokenizer_dir: str, lora: bool = False,
                **kwargs) -> DPOModule:
    models = ModelOptions(lora=LoraOptions(r=4) if lora else None)
    # (12 steps on 16 pairs: full weights margin 0.29 (IPO 0.30), every seed alike; LoRA
    # 0.10–0.14 over 8 seeds of the adapters' init)
    return DPOModule(policy=sft_model_dir, tokenizer=tokenizer_dir, judge="sorting",
                     optim=OptimSettings(lr=5e-3 if lora else 1e-2, warmup_steps=0), models=models,
                     rollout=RolloutSettings(max_new_tokens=8), **kwargs)


@torch.no_grad()
def train_metrics(module: DPOModule, batch: dict) -> dict[str, float]:
    """The loss and DPO metrics on ``batch`` (eval mode, nothing logged)."""
    was = module.model.training
    module.model.eval()
    try:
        loss, stats = module(batch)
        return {"loss": float(loss), **{k: float(v) for k, v in stats.items()}}
    finally:
        module.model.train(was)


def reference_state(module: DPOModule) -> dict[str, torch.Tensor]:
    """The reference's weights: the frozen copy's, or the LoRA policy's frozen base."""
    ref = module.reference if module.reference is not None else module.model
    return {k: v.detach().clone() for k, v in ref.named_parameters() if not v.requires_grad}


@pytest.mark.parametrize("loss_type,lora", [("sigmoid", False), ("ipo", False),
                                            ("sigmoid", True)],
                         ids=["dpo", "ipo", "dpo-lora"])
def test_dpo_trains_evaluates_and_exports(loss_type, lora, task_data, tokenizer_dir,
                                          sft_model_dir, tmp_path):
    L.seed_everything(0, verbose=False)
    train = head_file(f"{task_data}/pairs.jsonl", tmp_path / "pairs16.jsonl", 16)
    dm = make_data(task_data, tokenizer_dir, train, batch_size=8)
    module = make_module(sft_model_dir, tokenizer_dir, lora, dpo=DPOSettings(loss_type=loss_type),
                         export_dir=str(tmp_path / "model"))
    assert (module.reference is None) == lora  # LoRA: the adapters off, no second copy
    dm.setup("fit")
    batch = dm.collate(dm.train_set.items)
    before, ref_before = snapshot(module), reference_state(module)
    start = train_metrics(module, batch)
    assert start["rewards/margins"] == 0.0 and start["rewards/accuracies"] == 0.0  # π = π_ref

    trainer = build_trainer(tmp_path, max_steps=12, val_every=6, log_every_n_steps=4)
    trainer.fit(module, dm)

    end = train_metrics(module, batch)
    assert end["rewards/margins"] > 0.05, end
    assert end["rewards/accuracies"] >= 0.75, end
    assert end["loss"] < start["loss"], (start, end)
    assert_parameters_moved(module, before)  # trainable moved, frozen (the reference) did not
    for k, v in reference_state(module).items():
        assert torch.equal(v, ref_before[k]), f"reference weight {k} changed"
    assert module.reference is None or not module.reference.training

    # validation: the RL runs' history, the starting policy as step 0; the pair metrics
    history = module.evals.rows
    assert [h["rl_step"] for h in history] == [0, 6, 12]
    assert all(set(h) == EVAL_KEYS for h in history), history
    assert history[0]["eval/kl_to_ref"] == 0.0 and history[0]["eval/win_rate_vs_ref"] == 0.5
    assert history[-1]["eval/kl_to_ref"] != 0.0  # (a sampled k1 estimate: either sign)
    assert [p["rl_step"] for p in module.pair_history] == [6, 12]
    assert all(set(p) == PAIR_KEYS for p in module.pair_history)
    for key in ("val/rewards/margins", "train/rewards/margins", "train/rewards/accuracies",
                "train/logps/chosen", "eval/gold_reward", "eval/win_rate_vs_ref"):
        assert key in trainer.callback_metrics, (key, sorted(trainer.callback_metrics))
    assert float(trainer.callback_metrics["train/grad_norm"]) > 0  # (callbacks/grad_norm.py)

    # the summary has the RL module's shape; the study report loads the run as an RL run
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["history"] == history and summary["final_eval"] == history[-1]
    assert summary["rl_steps"] == 12 and summary["reference_eval"]["kl_to_ref"] == 0.0
    assert summary["estimator_args"] == {"beta": 0.1, "loss_type": loss_type,
                                         "label_smoothing": 0.0}
    assert len(summary["train_curve"]) == 12 and "margin" in summary["train_curve"][0]
    export = tmp_path / "model"
    meta = json.loads((export / ARTIFACT_FILE).read_text())
    assert (meta["kind"], meta["stage"]) == ("policy", "dpo")
    (run,) = load_runs({"dpo": {0: str(export)}})
    assert run.final == history[-1] and [h["rl_step"] for h in run.history] == [0, 6, 12]

    # the export is a plain policy directory (LoRA merged) with the run's tokenizer
    check_compatible(load_tokenizer(tokenizer_dir), str(export), "policy")
    hf = AutoModelForCausalLM.from_pretrained(str(export)).eval()
    ids, mask = join(batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"],
                     batch["response_mask"])
    kw = dict(input_ids=ids, attention_mask=mask.long(), position_ids=position_ids_from_mask(mask))
    module.model.eval()
    with torch.no_grad():
        assert_close(hf(**kw).logits, module.model(**kw).logits, rtol=1e-4, atol=1e-5)
    assert (export / "adapter").is_dir() == lora


def test_frozen_dtype_auto_casts_the_reference_where_bf16_has_kernels(task_data, tokenizer_dir,
                                                                       sft_model_dir, tmp_path):
    """``models.frozen_dtype=auto``: the reference in bfloat16 on a CPU with AVX-512 BF16 /
    AMX (float32 elsewhere), the policy in float32; the reference still does not move."""
    L.seed_everything(0, verbose=False)
    train = head_file(f"{task_data}/pairs.jsonl", tmp_path / "pairs16.jsonl", 16)
    dm = make_data(task_data, tokenizer_dir, train, batch_size=8)
    module = DPOModule(policy=sft_model_dir, tokenizer=tokenizer_dir,
                       optim=OptimSettings(lr=1e-2, warmup_steps=0),
                       models=ModelOptions(frozen_dtype="auto"),
                       rollout=RolloutSettings(max_new_tokens=8))
    build_trainer(tmp_path, max_steps=2, val_every=2).fit(module, dm)
    want = torch.bfloat16 if bf16_kernels(torch.device("cpu")) else torch.float32
    assert {p.dtype for p in module.reference.parameters()} == {want}
    assert {p.dtype for p in module.model.parameters()} == {torch.float32}
    assert math.isfinite(float(module.trainer.callback_metrics["train/loss"]))


# --- resume ---------------------------------------------------------------------------------

def _run(root: Path, task_data, tokenizer_dir, sft_model_dir, train: str, lora: bool,
         stop_at: int | None = None, ckpt: Path | None = None) -> DPOModule:
    L.seed_everything(0, verbose=False)
    module = make_module(sft_model_dir, tokenizer_dir, lora)
    dm = make_data(task_data, tokenizer_dir, train, batch_size=8)  # 2 batches an epoch
    trainer = build_trainer(root, max_steps=8, val_every=2, enable_checkpointing=True,
                            callbacks=[ModelCheckpoint(), *([StopAt(stop_at)] if stop_at else [])])
    make_resumable(trainer)  # the CLI's: atomic, last.ckpt, saved after each validation
    trainer.fit(module, dm, ckpt_path=str(ckpt) if ckpt else None)
    return module


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resume_is_exact(lora, task_data, tokenizer_dir, sft_model_dir, tmp_path):
    """8 steps == 4 + resume + 4: weights bit for bit, the same evaluation history (sampled
    answers: the RNG states are restored) and held-out pair metrics."""
    train = head_file(f"{task_data}/pairs.jsonl", tmp_path / "pairs16.jsonl", 16)
    args = (task_data, tokenizer_dir, sft_model_dir, train, lora)
    full = _run(tmp_path / "full", *args)
    _run(tmp_path / "half", *args, stop_at=4)
    last = tmp_path / "half" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)  # what Lightning's own load accepts
    assert saved["global_step"] == 4
    assert [h["rl_step"] for h in saved["dpo_state"]["evals"]["rows"]] == [0, 2, 4]
    keys = list(saved["state_dict"])
    assert not [k for k in keys if k.startswith("reference.")]  # reloaded, not stored
    if lora:  # the adapters only: the base weights are reloaded too
        assert [k for k in keys if "lora_" not in k and "rotary" not in k] == []
    resumed = _run(tmp_path / "half", *args, ckpt=last)

    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    assert resumed.evals.rows == full.evals.rows
    assert [h["rl_step"] for h in full.evals.rows] == [0, 2, 4, 6, 8]
    assert resumed.pair_history == full.pair_history


# --- set-up ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"beta": -1.0}, "beta must be > 0"),
    ({"loss_type": "ipo", "label_smoothing": 0.1}, "sigmoid only"),
    ({"label_smoothing": 0.5}, r"\[0, 0.5\)"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPOSettings(**kwargs)


@pytest.mark.parametrize("models,rollout,match", [
    (ModelOptions(critic_lora=LoraOptions()), RolloutSettings(), "critic_lora"),
    (ModelOptions(offload_frozen=True), RolloutSettings(), "offload_frozen"),
    (ModelOptions(), RolloutSettings(engine="vllm"), "rollout.engine='vllm'"),
])
def test_rl_only_options_are_refused(models, rollout, match):
    with pytest.raises(ValueError, match=match):
        check_dpo_options(models, rollout)


def test_datamodule_reads_every_file_first(task_data, tokenizer_dir, tmp_path):
    dm = make_data(task_data, tokenizer_dir, f"{task_data}/pairs.jsonl", batch_size=4)
    dm.check_files()
    pairs, prompts = dm.val_dataloader()
    assert "n_pairs" in next(iter(pairs))
    batch = next(iter(prompts))
    assert set(batch) == {"prompt_ids", "prompt_mask", "prompts", "prompt_index"}
    assert batch["prompt_index"].tolist() == list(range(8))
    missing = make_data(task_data, tokenizer_dir, f"{task_data}/pairs.jsonl", batch_size=4)
    missing.eval_path = str(tmp_path / "nope.jsonl")
    with pytest.raises((FileNotFoundError, ValueError), match="nope.jsonl"):
        missing.check_files()


@pytest.mark.parametrize("config", ["dpo.yaml", "instruct/dpo.yaml"])
def test_configs_parse(config, capsys):
    """Parsed only (``configs/dpo.yaml`` is also instantiated by tests/test_configs.py; the
    instruct one needs SmolLM2 and its sampled data)."""
    from dvpo_lightning.commands.fit import main

    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(CONFIGS / config), "--print_config"])
    assert e.value.code in (0, None), capsys.readouterr().err[-2000:]
    assert "DPOModule" in capsys.readouterr().out
