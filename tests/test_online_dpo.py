"""Online DPO (``model.init_args.online``): DPO that also trains on pairs of its own responses
labelled during the run, with the label rounds of semi-online DVPO.

Checked: the settings' rules; the pairs kept (chosen first, ties dropped, labels spent) and
the draws (a function of seed, step, micro-batch and rank alone); through the real Trainer on
the tiny task: rounds after the due steps only, within the budget, every kept pair labelled
as the annotator labels it, the online pairs changing what is learnt; N steps == N/2 +
resume + N/2 with rounds in both halves; a failing labeller named with its key and step.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import build_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from test_dpo_module import make_data, make_module
from test_resume import StopAt
from test_stage1_training import head_file

from dvpo_lightning.commands.fit import make_resumable
from dvpo_lightning.refresh.buffer import LabelledRow
from dvpo_lightning.refresh.labellers import LabellerError, load_labeller
from dvpo_lightning.refresh.online import OnlinePairs
from dvpo_lightning.refresh.rounds import Round
from dvpo_lightning.refresh.settings import OnlineSettings
from dvpo_lightning.tasks import get_task

KEY = "model.init_args.online"


def test_settings_name_the_online_key_and_need_prompts():
    with pytest.raises(ValueError, match=rf"{KEY}.every=2 needs {KEY}.prompts_path"):
        OnlineSettings(every=2)
    with pytest.raises(ValueError, match=rf"{KEY}.batch_pairs=0 must be >= 1.*{KEY}.labels=3 "
                                         "must be even|"
                                         rf"{KEY}.labels=3 must be even.*batch_pairs=0"):
        OnlineSettings(every=1, labels=3, batch_pairs=0, prompts_path="p.jsonl")
    assert not OnlineSettings().on  # off by default: offline DPO
    assert OnlineSettings(every=2, prompts_path="p.jsonl").on


def _round(labels: list[float], step: int = 2, same: tuple[int, ...] = ()) -> Round:
    """Two rows per prompt; the prompts in ``same`` get one answer twice."""
    rows = [LabelledRow(step, f"p{i // 2}", f"r{i}", [1, i // 2],
                        [10 + i - i % 2 if i // 2 in same else 10 + i], label, label)
            for i, label in enumerate(labels)]
    pairs = [(i, i + 1) if labels[i] > labels[i + 1] else (i + 1, i)
             for i in range(0, len(labels), 2) if labels[i] != labels[i + 1]]
    return Round(rows, {}, pairs, len(labels), 0.0, 0.0)


def test_kept_pairs_put_the_chosen_first_drop_ties_and_spend_the_labels():
    online = OnlinePairs(OnlineSettings(every=2, labels=8, budget=16, batch_pairs=5,
                                        prompts_path="p.jsonl"), load_labeller("sorting"))
    assert online.draw(2, 0) == []  # nothing bought yet
    bought = _round([0.2, 0.7, 0.5, 0.5, 0.9, 0.1, 0.3, 0.4], same=(3,))
    pairs = online.distinct(bought)
    assert bought.pairs == [(1, 0), (4, 5), (7, 6)] and pairs == [(1, 0), (4, 5)]
    online.keep(bought, pairs, 2, {"online/x": 1.0})
    # the tie is not a pair, one answer twice is not kept; every label is spent
    assert online.labels_used == 8 and online.n_pairs == 2
    assert [r.response for r in online.buffer.rows] == ["r1", "r0", "r4", "r5"]
    assert online.history[-1]["online/pairs_identical"] == 1.0
    assert online.done_after(2) and not online.done_after(4)
    assert online.history[-1]["online/pairs_kept"] == 2.0
    # the draws: batch_pairs items (prompt, chosen, prompt, rejected), a function of
    # (seed, step, micro-batch) alone
    a = online.draw(3, 0)
    assert len(a) == 5 and a == online.draw(3, 0) and a != online.draw(3, 1)
    assert {(tuple(c), tuple(r)) for _, c, _, r in a} <= {((11,), (10,)), ((14,), (15,))}
    restored = OnlinePairs(online.settings, online.labeller)
    restored.load_state_dict(online.state_dict())
    assert restored.draw(3, 0) == a and restored.labels_used == 8
    assert restored.rng.random() == online.rng.random()
    batch = online.batch(3, 0, pad_id=0)
    assert int(batch["n_pairs"]) == 5 and batch["response_ids"].shape[0] == 10


# --- through the Trainer -----------------------------------------------------------------------

def _online(task_data: str, **kwargs) -> OnlineSettings:
    return OnlineSettings(**{"every": 2, "labels": 8, "budget": 16, "batch_pairs": 4,
                             "prompts_path": f"{task_data}/rl_prompts.jsonl", **kwargs})


def _run(root: Path, task_data, tokenizer_dir, sft_model_dir, train: str,
         online: OnlineSettings | None, max_steps: int = 6, stop_at: int | None = None,
         ckpt: Path | None = None):
    L.seed_everything(0, verbose=False)
    module = make_module(sft_model_dir, tokenizer_dir,
                         **({"online": online} if online is not None else {}))
    dm = make_data(task_data, tokenizer_dir, train, batch_size=8)
    trainer = build_trainer(root, max_steps=max_steps, val_every=max_steps,
                            enable_checkpointing=True,
                            callbacks=[ModelCheckpoint(), *([StopAt(stop_at)] if stop_at else [])])
    make_resumable(trainer)
    trainer.fit(module, dm, ckpt_path=str(ckpt) if ckpt else None)
    return module


@pytest.fixture(scope="module")
def pairs16(task_data, tmp_path_factory) -> str:
    return head_file(f"{task_data}/pairs.jsonl", tmp_path_factory.mktemp("p") / "p16.jsonl", 16)


def test_rounds_buy_labelled_pairs_within_the_budget_and_change_the_update(
        task_data, tokenizer_dir, sft_model_dir, pairs16, tmp_path):
    args = (task_data, tokenizer_dir, sft_model_dir, pairs16)
    online = _run(tmp_path / "online", *args, _online(task_data))
    offline = _run(tmp_path / "offline", *args, None)
    o = online.online
    # after steps 2 and 4 (16 labels = 2 rounds of 8: the budget ends them); none after 6
    assert [h["step"] for h in o.history] == [2.0, 4.0] and o.labels_used == 16
    assert 0 < o.n_pairs <= 8
    task = get_task("sorting")
    for c, r in zip(o.buffer.rows[::2], o.buffer.rows[1::2]):
        assert c.prompt == r.prompt and c.label > r.label and c.step == r.step
        assert c.response_ids != r.response_ids
        for row in (c, r):  # the annotator's label: gold + N(0, 0.1²) noise, rounded
            assert min(abs(row.label - task.gold_score(row.prompt, row.response, finished))
                       for finished in (True, False)) < 0.45
            assert row.label == round(row.label, 4)
    assert all(0.0 <= h["online/reward_acc_before"] <= 1.0 or h["online/pairs"] == 0
               for h in o.history)
    # the implicit-reward accuracy: a pair and its swap sum to 1, a row against itself is 1/2
    batch = online.online.batch(6, 0, online.tokenizer.pad_token_id)
    n = int(batch.pop("n_pairs"))
    pairs = [(i, n + i) for i in range(n)]
    acc = online.implicit_accuracy(batch, pairs)
    assert acc + online.implicit_accuracy(batch, [(r, c) for c, r in pairs]) == 1.0
    assert online.implicit_accuracy(batch, [(0, 0), (1, 1)]) == 0.5
    summary = online.summary()["online"]
    assert summary["labels_used"] == 16 and summary["refreshes"] == 2
    assert summary["pairs"] == o.n_pairs and summary["model"] == "policy"
    # the bought pairs changed what was learnt; the offline run is DPO as before
    assert offline.online is None and "online" not in offline.summary()
    assert any(not torch.equal(a, b) for a, b in zip(online.model.parameters(),
                                                      offline.model.parameters()))
    assert "train/online/loss" in online.trainer.logged_metrics


def test_resume_is_exact_with_rounds_in_both_halves(task_data, tokenizer_dir, sft_model_dir,
                                                     pairs16, tmp_path):
    args = (task_data, tokenizer_dir, sft_model_dir, pairs16, _online(task_data))
    full = _run(tmp_path / "full", *args)
    _run(tmp_path / "half", *args, stop_at=3)
    last = tmp_path / "half" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 3 and saved["dpo_state"]["online"]["labels_used"] == 8
    resumed = _run(tmp_path / "half", *args, ckpt=last)
    untimed = [[{k: v for k, v in h.items() if not k.endswith(("_s", "seconds"))}
                for h in run.online.history]
               for run in (full, resumed)]
    assert untimed[0] == untimed[1] and len(untimed[0]) == 2
    assert resumed.online.buffer.rows == full.online.buffer.rows
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), f"{k} differs after resume"


def broken(prompt, response):
    raise RuntimeError("annotator offline")


def test_a_failing_labeller_names_its_key_and_the_step(task_data, tokenizer_dir, sft_model_dir,
                                                       pairs16, tmp_path):
    settings = _online(task_data, labeller=f"{__name__}:broken")
    with pytest.raises(LabellerError, match=rf"annotator offline on row 0 of the online DPO "
                                            rf"round after step 2.*{KEY}.labeller.*--ckpt_path"):
        _run(tmp_path, task_data, tokenizer_dir, sft_model_dir, pairs16, settings)


def test_the_draws_differ_by_rank(monkeypatch):
    online = OnlinePairs(OnlineSettings(every=1, labels=4, batch_pairs=8,
                                        prompts_path="p.jsonl"), load_labeller("sorting"))
    bought = _round([0.1, 0.9, 0.8, 0.2])
    online.keep(bought, online.distinct(bought), 1, {})
    import dvpo_lightning.refresh.online as mod

    draws = {}
    for rank in (0, 1):
        monkeypatch.setattr(mod, "rank_and_world", lambda r=rank: (r, 2))
        draws[rank] = online.draw(5, 0)
    assert draws[0] != draws[1]


def test_the_report_gives_online_dpo_a_row_of_its_rounds():
    """The refresh table reads online DPO's rounds: labels, rounds, the policy's accuracy on
    each round's pairs before it trains on them (no "after": nothing is refreshed), seconds,
    and the paired gold difference against offline DPO."""
    from dvpo_lightning.report.runs import Run
    from dvpo_lightning.report.tables import refresh_table

    def run(method, seed, gold, history=None):
        summary = {"cost": {"train_s": 10.0}, "final_eval": {"eval/gold_reward": gold}}
        if history is not None:
            summary["online"] = {"labels_used": 16, "refreshes": len(history),
                                 "history": history}
        return Run(method, seed, "x", summary)

    def rounds(*accs):
        return [{"online/reward_acc_before": a, "online/seconds": 1.5} for a in accs]

    runs = [run("dpo_online", 0, 0.6, rounds(0.5, 0.75)), run("dpo_online", 1, 0.5, rounds(0.25)),
            run("dpo", 0, 0.5), run("dpo", 1, 0.45)]
    table = refresh_table(runs, {"dpo_online": "dpo"})
    row = table["rows"]["dpo_online"]
    assert list(table["rows"]) == ["dpo_online"] and "online DPO" in table["title"]
    assert row["acc_before"]["values"] == pytest.approx([0.625, 0.25])
    assert row["acc_after"] is None and row["acc_bought"] is None
    assert row["refresh_s"]["values"] == pytest.approx([1.5, 1.5])
    assert row["refresh_share"]["values"] == pytest.approx([0.3, 0.15])
    assert row["gold_vs_frozen"]["values"] == pytest.approx([0.1, 0.05])
