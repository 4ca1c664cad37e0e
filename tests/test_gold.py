"""Gold scoring of generated token ids, and the GoldEval callback through a real Trainer."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest

from dvpo_lightning.callbacks import GoldEval
from dvpo_lightning.data.collate import pad_right
from dvpo_lightning.data.sft import SFTDataModule
from dvpo_lightning.models import load_tokenizer
from dvpo_lightning.modules import SFTModule
from dvpo_lightning.rollout.generation import mask_after_eos
from dvpo_lightning.rollout.gold import gold_scores
from dvpo_lightning.tasks.judges import load_judge


def test_gold_scores_known_answers(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    eos = tok.eos_token_id
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    rows = [enc("1237") + [eos], enc("12"), enc("1273") + [eos], enc("1237") + [eos] + enc("9")]
    ids, _ = pad_right(rows, tok.pad_token_id)
    mask = mask_after_eos(ids, eos) & (ids != tok.pad_token_id)
    got = gold_scores(load_judge("sorting"), tok, ["3172="] * 4, ids, mask, (eos,))
    # exact + EOS; correct prefix but unfinished; wrong at the third digit; text after EOS ignored
    assert got == pytest.approx([1.0, 2 / 5, 2 / 5, 1.0])


def test_gold_eval_callback_writes_summary(task_data, tokenizer_dir, tmp_path):
    L.seed_everything(0, verbose=False)
    cb = GoldEval(prompts_path=str(Path(task_data) / "eval_prompts.jsonl"), max_prompts=8,
                  max_new_tokens=10)
    dm = SFTDataModule(train_path=str(Path(task_data) / "sft.jsonl"), tokenizer=tokenizer_dir,
                       batch_size=8, max_length=32)
    module = SFTModule(backbone="test-llama", tokenizer=tokenizer_dir)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=1,
                        val_check_interval=2, callbacks=[cb], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=dm)
    summary = json.loads((tmp_path / "gold_eval.json").read_text())
    assert summary["global_step"] == 2
    assert 0.0 <= summary["gold_reward"] <= 1.0 and 0.0 <= summary["exact"] <= 1.0
    assert 0 < summary["response_len"] <= 10
    assert "eval/gold_reward" in trainer.callback_metrics  # logged at validation too
