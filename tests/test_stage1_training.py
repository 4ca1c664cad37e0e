"""Stage 1 through the real Lightning ``Trainer`` on the tiny task data with tiny models.

Each run asserts: every logged training loss is finite; the loss on a fixed batch went down;
every trainable parameter changed while frozen parameters and buffers did not; the exported
artifact loads back with ``transformers`` (or ``ValueModel.from_pretrained``) and gives the
trained module's outputs; value models print their pair-accuracy table and write
``summary.json``.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from dvpo_lightning.data.collate import join
from dvpo_lightning.data.pairwise import PairwiseDataModule
from dvpo_lightning.data.sft import SFTDataModule
from dvpo_lightning.data.value import ValueDataModule
from dvpo_lightning.metrics import AGGREGATIONS
from dvpo_lightning.models import ValueModel, freeze, load_tokenizer, position_ids_from_mask
from dvpo_lightning.modules import (
    GVMModule,
    OptimSettings,
    ReturnTargets,
    RewardModelModule,
    ScoreRewardModelModule,
    SFTModule,
)
from dvpo_lightning.modules.reward_model import final_scores
from dvpo_lightning.ops.losses import (
    bradley_terry_loss,
    score_regression_loss,
    value_regression_loss,
)
from dvpo_lightning.ops.returns import gvm_value_targets
from dvpo_lightning.runtime.artifacts import ARTIFACT_FILE

STEPS = 24  # ~0.3 s per run on one thread; enough for margins seen over 8 seeds


class LossRecorder(L.Callback):
    """The loss returned by every training step."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def head_file(src: str, dst, n: int, spread: bool = False) -> str:
    """``n`` rows of ``src`` written to ``dst``: a training set small enough that ``STEPS``
    steps visit each row many times, so the loss on it must go down. The first ``n`` rows, or
    with ``spread`` every k-th row (so every behaviour policy appears, for τ-conditioning)."""
    with open(src) as f:
        rows = [line for line in f if line.strip()]
    rows = rows[:: max(1, len(rows) // n)][:n] if spread else rows[:n]
    dst.write_text("".join(rows))
    return str(dst)


def fixed_batch(dm, collate, n: int | None = None) -> dict:
    """The first ``n`` (default all) training items, collated: the same batch before and after
    training."""
    dm.setup("fit")
    return collate(dm.train_set.items[:n])


@torch.no_grad()
def batch_loss(module, batch: dict) -> float:
    """The module's training objective on ``batch``, without logging (eval mode)."""
    was = module.training
    module.eval()
    try:
        if isinstance(module, SFTModule):
            return float(module(batch)[0])
        values = module.response_values(batch)
        if isinstance(module, RewardModelModule):
            n = int(batch["n_pairs"])
            s = final_scores(values, batch["response_mask"])
            return float(bradley_terry_loss(s[:n], s[n:], module.margin))
        r = module.returns
        targets, mask = gvm_value_targets(values, batch["response_mask"], batch["returns"],
                                          r.target, r.gamma, r.lam, r.positions)
        return float(value_regression_loss(values, targets, mask))
    finally:
        module.train(was)


@torch.no_grad()
def terminal_error(module, batch: dict) -> float:
    """``mean ½·(u_L − r)²``: the value of each finished response against its return, the one
    target every GVM mode shares (a fixed objective, unlike a bootstrapped TD loss)."""
    was = module.training
    module.eval()
    try:
        u_final = final_scores(module.response_values(batch), batch["response_mask"])
        return float((0.5 * (u_final - batch["returns"]) ** 2).mean())
    finally:
        module.train(was)


def snapshot(module) -> tuple[dict, dict, set]:
    params = {k: p.detach().clone() for k, p in module.named_parameters()}
    buffers = {k: b.detach().clone() for k, b in module.named_buffers()}
    trainable = {k for k, p in module.named_parameters() if p.requires_grad}
    return params, buffers, trainable


def assert_parameters_moved(module, before) -> None:
    params, buffers, trainable = before
    assert trainable, "nothing is trainable"
    unchanged = [k for k, p in module.named_parameters()
                 if k in trainable and torch.equal(p.detach(), params[k])]
    assert not unchanged, f"trainable parameters that did not change: {unchanged}"
    moved_frozen = [k for k, p in module.named_parameters()
                    if k not in trainable and not torch.equal(p.detach(), params[k])]
    assert not moved_frozen, f"frozen parameters that changed: {moved_frozen}"
    assert {k for k, p in module.named_parameters() if p.requires_grad} == trainable
    for k, b in module.named_buffers():
        assert torch.equal(b, buffers[k]), f"buffer {k} changed"


def fit(module, dm, root, make_trainer, val: bool):
    rec = LossRecorder()
    # (metrics that cost work are computed on the loggers' steps only: runtime/log_steps.py)
    trainer = make_trainer(root, max_steps=STEPS, val_every=STEPS if val else None,
                           callbacks=[rec], log_every_n_steps=STEPS // 3)
    trainer.fit(module, dm)
    assert trainer.global_step == STEPS
    assert len(rec.losses) == STEPS
    assert all(math.isfinite(x) for x in rec.losses), rec.losses
    assert float(trainer.callback_metrics["train/grad_norm"]) > 0  # (callbacks/grad_norm.py)
    return trainer, rec.losses


def assert_accuracy_report(capsys, module, trainer, n_pairs: int) -> None:
    out = capsys.readouterr().out
    title = f"{module.table_title} — held-out pair accuracy ({n_pairs} pairs)"
    assert title in out, out
    report = json.loads((Path(trainer.default_root_dir) / "summary.json").read_text())
    assert report["model"] == module.kind
    assert report["pairs"] == n_pairs
    assert report["global_step"] == STEPS
    assert list(report["accuracy"]) == list(AGGREGATIONS)
    for how, acc in report["accuracy"].items():
        assert 0.0 <= acc <= 1.0
        assert re.search(rf"^\| {how} \| {acc:.4f} \|$", out, re.M), (how, out)
        logged = trainer.callback_metrics[f"val/pair_acc/{how}"]
        assert float(logged) == pytest.approx(acc)


def assert_value_export(module, batch) -> None:
    export = module.hparams.export_dir
    meta = json.loads((Path(export) / ARTIFACT_FILE).read_text())
    assert meta["kind"] == module.kind and meta["global_step"] == STEPS
    loaded = ValueModel.from_pretrained(export, load_tokenizer(export)).eval()
    assert loaded.kind == module.kind
    ids, mask = join(batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"],
                     batch["response_mask"])
    module.eval()
    with torch.no_grad():
        assert_close(loaded(ids, mask), module.model(ids, mask))
    assert bool((loaded.head.weight != 0).any())  # the trained head, not a fresh zero one


# --- SFT ------------------------------------------------------------------------------------


def test_sft_trains_and_exports(task_data, tokenizer_dir, tmp_path, make_trainer):
    L.seed_everything(0, verbose=False)
    dm = SFTDataModule(train_path=os.path.join(task_data, "sft.jsonl"), tokenizer=tokenizer_dir,
                       batch_size=16, max_length=32)
    module = SFTModule(backbone="test-llama", tokenizer=tokenizer_dir,
                       optim=OptimSettings(lr=1e-2, warmup_steps=0),
                       export_dir=str(tmp_path / "model"))
    batch = fixed_batch(dm, dm.collate, 32)
    loss0, before = batch_loss(module, batch), snapshot(module)

    fit(module, dm, tmp_path, make_trainer, val=False)

    loss1 = batch_loss(module, batch)
    assert loss1 < 0.8 * loss0, (loss0, loss1)  # 8 seeds: ≤ 0.62
    assert_parameters_moved(module, before)

    export = str(tmp_path / "model")
    hf = AutoModelForCausalLM.from_pretrained(export).eval()
    tok = load_tokenizer(export)
    assert tok.get_vocab() == module.tokenizer.get_vocab()
    ids, mask = join(batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"],
                     batch["response_mask"])
    kw = dict(input_ids=ids, attention_mask=mask.long(), position_ids=position_ids_from_mask(mask))
    module.eval()
    with torch.no_grad():
        assert_close(hf(**kw).logits, module.model(**kw).logits)
    meta = json.loads((Path(export) / ARTIFACT_FILE).read_text())
    assert meta["stage"] == "sft" and meta["global_step"] == STEPS


# --- reward model ---------------------------------------------------------------------------


def test_reward_model_trains_reports_and_exports(task_data, sft_model_dir, tmp_path,
                                                 make_trainer, capsys):
    L.seed_everything(0, verbose=False)
    train = head_file(os.path.join(task_data, "pairs.jsonl"), tmp_path / "pairs16.jsonl", 16)
    dm = PairwiseDataModule(train_path=train,
                            val_path=os.path.join(task_data, "eval_pairs.jsonl"),
                            tokenizer=sft_model_dir, batch_size=16, val_batch_size=32,
                            max_length=32)
    module = RewardModelModule(backbone=sft_model_dir, optim=OptimSettings(lr=1e-2, warmup_steps=0),
                               export_dir=str(tmp_path / "model"))
    assert not module.model.head.weight.any()  # zero init: step 1 only moves the head
    batch = fixed_batch(dm, dm.collate)
    loss0, before = batch_loss(module, batch), snapshot(module)
    assert loss0 == pytest.approx(math.log(2), abs=1e-6)

    trainer, _ = fit(module, dm, tmp_path, make_trainer, val=True)

    assert batch_loss(module, batch) < 0.8 * loss0  # 8 seeds: ≤ 0.65 · log 2
    assert_parameters_moved(module, before)
    assert_accuracy_report(capsys, module, trainer, len(dm.val_set))
    assert_value_export(module, batch)


def test_score_reward_model_regresses_the_final_score_and_exports(task_data, sft_model_dir,
                                                                   tmp_path, make_trainer, capsys):
    # the information 2 × 2's fourth cell: a reward model (one score per finished response) fit
    # to the annotated scores the GVM regresses, not to the pairs derived from them
    L.seed_everything(0, verbose=False)
    train = head_file(os.path.join(task_data, "trajectories.jsonl"), tmp_path / "t.jsonl", 32)
    dm = ValueDataModule(train_path=train, val_path=os.path.join(task_data, "eval_pairs.jsonl"),
                         tokenizer=sft_model_dir, train_kind="scored", batch_size=16,
                         val_batch_size=32, max_length=32)
    module = ScoreRewardModelModule(backbone=sft_model_dir,
                                    optim=OptimSettings(lr=1e-2, warmup_steps=0),
                                    export_dir=str(tmp_path / "model"))
    batch = fixed_batch(dm, dm.collate_train)
    # zero-initialised head: every score is 0, so the loss is mean ½·s² (hand-computed)
    err0, before = terminal_error(module, batch), snapshot(module)
    assert err0 == pytest.approx(float((0.5 * batch["returns"] ** 2).mean()), abs=1e-6)

    trainer, _ = fit(module, dm, tmp_path, make_trainer, val=True)

    assert terminal_error(module, batch) < 0.5 * err0
    assert_parameters_moved(module, before)
    assert_accuracy_report(capsys, module, trainer, len(dm.val_set))
    assert_value_export(module, batch)
    assert module.kind == "reward"  # (RL runs load it as a reward model)


def test_score_reward_model_refuses_pairs_and_a_margin(task_data, sft_model_dir):
    with pytest.raises(TypeError, match="margin"):  # (the CLI: "unknown key 'margin'")
        ScoreRewardModelModule(backbone=sft_model_dir, margin=0.5)
    module = ScoreRewardModelModule(backbone=sft_model_dir)
    with pytest.raises(ValueError, match="train_kind: scored"):
        module.training_step({"n_pairs": 1}, 0)


def test_score_regression_loss_by_hand():
    scores, targets = torch.tensor([1.0, -0.5, 0.25]), torch.tensor([0.5, 0.5, 0.25])
    assert float(score_regression_loss(scores, targets)) == pytest.approx(
        (0.5 * 0.25 + 0.5 * 1.0 + 0.0) / 3)


# --- GVM ------------------------------------------------------------------------------------

# Pairwise rows get returns 1 (chosen) / 0 (rejected) here, not ±1: ±1 averages to zero over a
# pair of near-identical responses, so a few steps could only lower the loss by telling them
# apart; with 1 / 0 there is a mean to learn and the loss must fall.
GVM_CASES = {
    # target, train file, train_kind, tau_conditioning, frozen embeddings
    "td0-pairwise": ("td0", "pairs.jsonl", "pairwise", False, False),
    "td_lambda-scored": ("td_lambda", "trajectories.jsonl", "scored", False, False),
    "mc-scored": ("mc", "trajectories.jsonl", "scored", False, False),
    "td_lambda-tau-frozen-embeddings": ("td_lambda", "trajectories.jsonl", "scored", True, True),
}


@pytest.mark.parametrize("case", list(GVM_CASES))
def test_gvm_trains_reports_and_exports(case, task_data, sft_model_dir, tmp_path, make_trainer,
                                        capsys):
    target, train_file, kind, tau, frozen_embeddings = GVM_CASES[case]
    L.seed_everything(0, verbose=False)
    train = head_file(os.path.join(task_data, train_file), tmp_path / "train.jsonl", 32, tau)
    dm = ValueDataModule(train_path=train,
                         val_path=os.path.join(task_data, "eval_pairs.jsonl"),
                         tokenizer=sft_model_dir, train_kind=kind, chosen_return=1.0,
                         rejected_return=0.0, tau_conditioning=tau,
                         batch_size=16, val_batch_size=32, max_length=64 if tau else 32)
    module = GVMModule(backbone=sft_model_dir, returns=ReturnTargets(target=target),
                       optim=OptimSettings(lr=1e-2, warmup_steps=0),
                       export_dir=str(tmp_path / "model"))
    if frozen_embeddings:
        freeze(module.model.backbone.embed_tokens)
    batch = fixed_batch(dm, dm.collate_train)
    loss0, before = batch_loss(module, batch), snapshot(module)
    err0 = terminal_error(module, batch)
    assert loss0 > 0

    trainer, _ = fit(module, dm, tmp_path, make_trainer, val=True)

    loss1, err1 = batch_loss(module, batch), terminal_error(module, batch)
    assert loss1 < 0.7 * loss0, (loss0, loss1)  # 8 seeds: ≤ 0.52
    assert err1 < 0.7 * err0, (err0, err1)
    assert_parameters_moved(module, before)
    if frozen_embeddings:
        assert not module.model.backbone.embed_tokens.weight.requires_grad
    assert_accuracy_report(capsys, module, trainer, len(dm.val_set))
    assert_value_export(module, batch)


def test_one_spelling_of_the_model_options_in_every_stage(tokenizer_dir):
    # `models` is one group in every stage (RL's and DPO's ModelOptions extends stage 1's
    # LoadOptions), and its dtype is honoured: the trained model loads in it
    from dvpo_lightning.models.options import LoadOptions
    from dvpo_lightning.modules import DPOModule, DVPOModule

    for cls in (SFTModule, GVMModule, RewardModelModule, ScoreRewardModelModule, DPOModule,
                DVPOModule):
        params = {}
        for klass in reversed(cls.__mro__):  # (the value heads take theirs through **kwargs)
            if "__init__" in vars(klass):
                params.update(inspect.signature(klass.__init__).parameters)
        assert isinstance(params["models"].default, LoadOptions), cls
        assert type(params["optim"].default).__name__.endswith("OptimSettings"), cls
    module = SFTModule(backbone="test-llama", tokenizer=tokenizer_dir,
                       models=LoadOptions(dtype="bfloat16"))
    assert {p.dtype for p in module.model.parameters()} == {torch.bfloat16}
    gvm = GVMModule(backbone="test-llama", tokenizer=tokenizer_dir,
                    models=LoadOptions(dtype="bfloat16"))
    assert {p.dtype for p in gvm.model.backbone.parameters()} == {torch.bfloat16}
