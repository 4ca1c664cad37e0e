"""Semi-online DVPO's parts (dvpo_lightning/refresh): the settings and the label budget, the
labellers and their errors, the drift's pairs, and one refresh of a real tiny GVM."""

from __future__ import annotations

import json
import random
import textwrap

import pytest
import torch

from dvpo_lightning.estimators import GAE, GRPO, GVM, ReMax
from dvpo_lightning.modules.gvm import ReturnTargets
from dvpo_lightning.refresh import (
    GVMObjective,
    LabellerError,
    Refresher,
    RefreshSettings,
    RewardObjective,
    load_labeller,
)
from dvpo_lightning.refresh.rounds import _pairs
from dvpo_lightning.refresh.setup import make_refresher
from dvpo_lightning.tasks import get_task


def test_settings_name_every_broken_key():
    with pytest.raises(ValueError) as e:
        RefreshSettings(every=-1, labels=3, replay=1.5)
    msg = str(e.value)
    for part in ("model.init_args.refresh.every=-1", "model.init_args.refresh.labels=3 must be "
                 "even", "model.init_args.refresh.replay=1.5 must be in [0, 1)", "Fix"):
        assert part in msg
    with pytest.raises(ValueError, match=r"refresh.replay=0.5 needs model.init_args.refresh."
                                         r"replay_path"):
        RefreshSettings(every=2)
    assert not RefreshSettings().on  # off by default: DVPO as in the paper
    assert RefreshSettings(every=2, replay=0).on


@pytest.mark.parametrize("kind,budget,expected", [
    ("scores", None, [8, 8, 8, 8]),
    ("scores", 20, [8, 8, 4, 0]),   # the last refresh buys what is left
    ("scores", 19, [8, 8, 2, 0]),   # ... even: two responses per prompt
    ("pairs", 19, [8, 8, 3, 0]),
    ("scores", 0, [0, 0, 0, 0]),
])
def test_the_budget_is_spent_and_never_passed(kind, budget, expected):
    s = RefreshSettings(every=1, labels=8, budget=budget, kind=kind, replay=0)
    used, got = 0, []
    for _ in expected:
        n = s.labels_next(used)
        got.append(n)
        used += n
    assert got == expected
    assert budget is None or used <= budget
    assert s.on == (expected[0] > 0)


def test_the_sorting_labeller_is_the_gold_judge_with_the_datas_noise():
    lab = load_labeller("sorting")
    assert lab.noise == 0.1  # the embedded data's annotator (commands/data/sorting.py)
    task = get_task("sorting")
    rng = random.Random(3)
    prompts = [task.sample_prompt(rng) for _ in range(6)]
    responses = [task.reference(p) if i % 2 else "x" for i, p in enumerate(prompts)]
    noise = random.Random(7)
    z = [noise.gauss(0.0, 1.0) for _ in prompts]
    labels = lab.label(prompts, responses, [True] * 6, step=4, z=z)
    again = random.Random(7)  # the data command's annotator: gold + gauss(0, 0.1), rounded
    expected = [round(task.gold_score(p, r) + again.gauss(0.0, 0.1), 4)
                for p, r in zip(prompts, responses)]
    assert labels == expected
    exact = load_labeller("sorting", noise=0.0).label(prompts, responses, [True] * 6, 4, z)
    assert exact == [task.gold_score(p, r) for p, r in zip(prompts, responses)]


def test_a_users_labeller_and_what_its_failures_say(tmp_path, monkeypatch):
    (tmp_path / "my_labels.py").write_text(textwrap.dedent("""
        def length(prompt, response):
            return len(response)

        def broken(prompt, response):
            if response == "b":
                raise KeyError("no such row")
            return 1.0

        def not_a_number(prompt, response):
            return "good"
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    lab = load_labeller("my_labels:length")
    assert lab.noise == 0.0
    assert lab.label(["p", "q"], ["ab", "abcd"], [True, True], 2, [0.3, -1.0]) == [2.0, 4.0]
    with pytest.raises(LabellerError, match=r"the labeller 'my_labels:broken' raised KeyError.*"
                       r"on row 1 of the refresh after RL step 6.*Fix.*--ckpt_path last"):
        load_labeller("my_labels:broken").label(["p", "q"], ["a", "b"], [True, True], 6,
                                                [0.0, 0.0])
    with pytest.raises(LabellerError, match=r"returned 'good' \(str\) on row 0 .*a labeller "
                                            r"returns a finite number"):
        load_labeller("my_labels:not_a_number").label(["p"], ["a"], [True], 1, [0.0])
    with pytest.raises(ValueError, match=r"model.init_args.refresh.labeller='nope' is neither a "
                       r"registered labeller \(instruct, sorting\)"):
        load_labeller("nope")


def test_pairs_take_the_larger_label_and_drop_ties():
    assert _pairs([0.2, 0.5, 0.3, 0.3, 0.9, 0.1]) == [(1, 0), (4, 5)]


def test_a_refresh_trains_the_frozen_model_the_estimator_scores_with():
    on = RefreshSettings(every=1, replay=0)
    gvm = make_refresher(on, GVM().needs, "GVM", "gvm_dir", None)
    assert gvm.role == "gvm" and isinstance(gvm.objective, GVMObjective)
    for estimator in (GAE(), GRPO(), ReMax()):  # PPO and the critic-free RM methods
        rm = make_refresher(on, estimator.needs, "X", None, "rm_dir")
        assert rm.role == "reward_model" and isinstance(rm.objective, RewardObjective)
    with pytest.raises(ValueError, match=r"refresh.every=1 refreshes the frozen GVM or reward "
                                         r"model, and the estimator GRPO uses neither"):
        make_refresher(on, GRPO().needs, "GRPO", None, None)
    assert make_refresher(RefreshSettings(), GVM().needs, "GVM", "gvm_dir") is None


def test_the_reward_objective_pairs_the_two_labelled_responses_of_a_prompt():
    from dvpo_lightning.refresh import LabelledRow

    def row(label, response):
        return LabelledRow(1, "p", "r", [5], response, label, label)

    rows = [row(0.2, [1]), row(0.7, [2]), row(0.4, [3]), row(0.4, [4]), row(0.9, [5]),
            row(0.1, [6])]
    pairs = RewardObjective().from_buffer(rows, random.Random(0), 50)
    assert set(map(str, pairs)) == {str(([5], [2], [1])), str(([5], [5], [6]))}  # (tie: none)
    assert RewardObjective().from_buffer(rows[2:4], random.Random(0), 3) == []


def test_one_refresh_trains_the_gvm_toward_its_new_labels(artifacts, task_data, tokenizer_dir):
    """A real tiny GVM and policy: the refresh samples, labels and trains; the GVM's weights
    move, it is frozen again after, its pair accuracy on the labelled samples rises, and the
    buffer holds exactly the labels bought."""
    from dvpo_lightning.data.rollout import encode_prompts
    from dvpo_lightning.data.tokenize import LengthReport
    from dvpo_lightning.models import ValueModel, load_causal_lm, load_tokenizer
    from dvpo_lightning.models.value_model import freeze
    from dvpo_lightning.rollout.generation import HFGenerator, SamplingConfig

    tok = load_tokenizer(tokenizer_dir)
    gvm = freeze(ValueModel.from_pretrained(artifacts.gvm, tok))
    start = {k: v.clone() for k, v in gvm.state_dict().items()}
    policy = load_causal_lm(artifacts.policy, tok)

    class Prompts:  # what encode_prompts reads of a DataModule
        tokenizer, chat_template = tok, False

        def check_vocabulary(self, path, seqs) -> None:
            pass

    rows = [{"prompt": get_task("sorting").sample_prompt(random.Random(i))} for i in range(20)]
    prompts = encode_prompts(Prompts(), rows, "prompts", LengthReport("prompts", 64, "t"), 64)
    refresher = Refresher(RefreshSettings(every=1, labels=16, steps=30, lr=3e-3,
                                          batch_size=16, replay=0), load_labeller("sorting"),
                          GVMObjective(ReturnTargets(target="mc")))
    refresher.attach(prompts, [])
    gen = HFGenerator((tok.eos_token_id,), tok.pad_token_id)
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.0)

    def sample(ids, mask, seeds):
        return gen.generate(policy, ids, mask, cfg, None, seeds)

    log = refresher(gvm, sample, tok, (tok.eos_token_id,), 5, torch.device("cpu"))
    assert len(refresher.buffer) == 16 and refresher.labels_used == 16
    assert log["refresh/labels_used"] == 16 and log["refresh/pairs"] > 0
    assert log["refresh/pair_acc_after"] > log["refresh/pair_acc_before"]
    assert log["refresh/pair_acc_after"] >= 0.75
    assert not gvm.training and not any(p.requires_grad for p in gvm.parameters())
    moved = [k for k, v in gvm.state_dict().items() if not torch.equal(v, start[k])]
    assert any("head" in k for k in moved) and len(moved) > len(start) // 2
    assert {r.step for r in refresher.buffer.rows} == {5}
    state = refresher.state_dict()
    again = Refresher(refresher.settings, refresher.labeller, refresher.objective)
    again.load_state_dict(state)
    assert again.buffer.rows == refresher.buffer.rows
    assert again.rng.random() == refresher.rng.random()


def test_the_refresh_trains_on_the_targets_its_gvm_directory_records(tmp_path):
    from dvpo_lightning.modules.gvm import trained_returns
    from dvpo_lightning.runtime.artifacts import ARTIFACT_FILE

    assert trained_returns(str(tmp_path)) == ReturnTargets()  # (no record: the defaults)
    target = {"target": "td0", "gamma": 0.9, "lam": 0.5, "positions": "before_token"}
    (tmp_path / ARTIFACT_FILE).write_text(json.dumps({"returns": target}))
    assert trained_returns(str(tmp_path)) == ReturnTargets(**target)
    (tmp_path / ARTIFACT_FILE).write_text(json.dumps({"hparams": {"returns": {"target": "mc"}}}))
    assert trained_returns(str(tmp_path)) == ReturnTargets(target="mc")  # (a CLI run's record)


def test_replay_fraction_replays_the_rows_train_fraction_trained_on(task_data, tokenizer_dir):
    from types import SimpleNamespace

    from dvpo_lightning.data.value import ValueDataModule
    from dvpo_lightning.models import load_tokenizer
    from dvpo_lightning.refresh.setup import refresh_inputs

    path = f"{task_data}/trajectories.jsonl"
    tok = load_tokenizer(tokenizer_dir)
    dm = SimpleNamespace(chat_template=False, train_set=[([1, 2], "p")])
    def inputs(**kwargs):
        refresher = Refresher(RefreshSettings(every=1, replay_path=path, **kwargs),
                              load_labeller("sorting"), GVMObjective(ReturnTargets()))
        return refresh_inputs(refresher, dm, tok, longest=10_000)

    prompts, replay = inputs(replay_fraction=0.5)
    stage1 = ValueDataModule(train_path=path, val_path=f"{task_data}/eval_pairs.jsonl",
                             tokenizer=tokenizer_dir, train_fraction=0.5)._train_rows()
    assert prompts == [([1, 2], "p")]
    assert sorted(score for _, _, score in replay) == sorted(r["score"] for r in stage1)
    assert 0 < len(replay) < len(inputs()[1])


def test_the_report_table_of_the_refreshes_by_hand():
    from dvpo_lightning.report.runs import Run
    from dvpo_lightning.report.tables import refresh_table

    def run(seed, before, after, seconds, train_s):
        history = [{"refresh/pair_acc_before": b, "refresh/pair_acc_after": a,
                    "refresh/seconds": s} for b, a, s in zip(before, after, seconds)]
        return Run("so", seed, "x", {"refresh": {"labels_used": 8, "refreshes": len(history),
                                                 "history": history},
                                     "cost": {"train_s": train_s}})

    nan = float("nan")  # (a refresh whose pairs all tied: left out of the mean)
    def final(method, seed, gold):
        return Run(method, seed, "y", {"cost": {"train_s": 5.0}, "final_eval": {
            "eval/gold_reward": gold}})

    runs = [run(0, [0.5, 0.7], [0.7, 0.9], [1.0, 3.0], 20.0),
            run(1, [0.6, nan], [0.8, nan], [2.0, 2.0], 8.0),
            final("frozen", 0, 0.5), final("frozen", 1, 0.25)]
    for r, gold in zip(runs, (0.75, 0.5)):
        r.summary["final_eval"] = {"eval/gold_reward": gold}
    table = refresh_table(runs, {"so": "frozen"})
    row = table["rows"]["so"]
    assert list(table["rows"]) == ["so"]  # (a method that never refreshed has no row)
    assert row["labels_used"]["mean"] == 8 and row["refreshes"]["values"] == [2, 2]
    assert row["acc_before"]["values"] == pytest.approx([0.6, 0.6])
    assert row["acc_after"]["values"] == pytest.approx([0.8, 0.8])
    assert row["acc_bought"]["values"] == pytest.approx([0.2, 0.2])
    assert row["refresh_s"]["values"] == pytest.approx([2.0, 2.0])
    assert row["refresh_share"]["values"] == pytest.approx([4.0 / 20.0, 4.0 / 8.0])
    assert row["frozen"] == {"text": "frozen"}
    assert row["gold_vs_frozen"]["values"] == pytest.approx([0.25, 0.25])  # refreshed − frozen
    assert row["gold_vs_frozen"]["p"] is not None  # (joins the report's Holm family)
    assert refresh_table(runs[2:]) is None


def test_a_refresh_refuses_a_partitioned_or_bfloat16_model():
    from types import SimpleNamespace

    from dvpo_lightning.refresh.setup import check_refresh

    model = torch.nn.Linear(2, 2)
    check_refresh(model, SimpleNamespace())  # float32, not partitioned: fine
    with pytest.raises(ValueError, match=r"cannot be refreshed under ZeRO-3.*Fix: use "
                                         r"configs/deepspeed/zero1.yaml"):
        check_refresh(model, SimpleNamespace(zero_stage_3=True))
    with pytest.raises(ValueError, match=r"is in \['torch.bfloat16'\], not float32. Fix: set "
                                         r"model.init_args.models.frozen_dtype=float32"):
        check_refresh(model.to(torch.bfloat16), SimpleNamespace())
