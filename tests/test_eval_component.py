"""The one held-out evaluation (modules/evaluation.py) of the RL module and DPO, through the
real CLI / Trainer on the tiny task: each prompt's values in the summary, the final test
evaluation of ``data.test_path``, and common random numbers end to end (``eval_seed``): the
same prompt answered by the same policy gets the same answer at the last validation and at
the test evaluation, whatever the global RNG did in between, and two runs of other methods
and other seeds evaluate their (shared) reference identically."""

from __future__ import annotations

import json

import lightning as L
import pytest
from conftest import build_trainer
from test_dpo_module import EVAL_KEYS, make_data, make_module
from test_rl_training import make_cli
from test_stage1_training import head_file

pytestmark = pytest.mark.filterwarnings("ignore")


def rl_summary(name, root, artifacts, task_data, *extra):
    cli, _ = make_cli(name, root, artifacts, task_data,
                      f"--data.init_args.test_path={task_data}/eval_prompts.jsonl", *extra)
    cli.trainer.fit(cli.model, cli.datamodule)
    return json.loads((root / "summary.json").read_text())


def check_items(s: dict, n: int) -> None:
    """Per-prompt values: ``n`` per measure, their means the logged means."""
    for items, means in ((s["final_eval_items"], s["final_eval"]),
                         (s["reference_eval_items"], s["reference_eval"]),
                         (s["test_eval_items"], s["test_eval"]),
                         (s["reference_test_eval_items"], s["reference_test_eval"])):
        assert all(len(v) == n for v in items.values())
        for k, v in items.items():
            flat = [x for row in v for x in (row if isinstance(row, list) else [row])]
            mean = means[k] if k in means else means[f"eval/{k}"]
            assert abs(sum(flat) / len(flat) - mean) < 1e-6, (k, v, mean)
    assert set(s["test_eval"]) == set(s["final_eval"])


def test_rl_summary_items_test_eval_and_common_random_numbers(tmp_path, artifacts, task_data):
    """The test file here is the validation file (4 prompts) so the answers can be compared:
    with ``eval_seed`` the policy's test answers are its last validation's and the reference's
    test answers its step-0 answers, to the bit; DVPO and GRPO at other global seeds evaluate
    the reference identically; without ``eval_seed`` none of this holds."""
    crn = ["--model.init_args.rollout.eval_seed=11"]
    a = rl_summary("dvpo", tmp_path / "a", artifacts, task_data, "--seed_everything=1", *crn)
    b = rl_summary("grpo", tmp_path / "b", artifacts, task_data, "--seed_everything=2", *crn)
    for s in (a, b):
        check_items(s, 4)
        assert s["test_eval_items"] == s["final_eval_items"]
        assert s["reference_test_eval_items"] == s["reference_eval_items"]
    ra, rb = a["reference_eval_items"], b["reference_eval_items"]
    shared = set(ra) & set(rb)  # (DVPO's GVM values, GRPO's RM scores: their own)
    assert {"response_len", "gold_reward"} <= shared
    assert {k: ra[k] for k in shared} == {k: rb[k] for k in shared}
    c = rl_summary("dvpo", tmp_path / "c", artifacts, task_data, "--seed_everything=2",
                   "--model.init_args.rollout.eval_seed=null")  # (the config sets one)
    check_items(c, 4)
    assert c["reference_test_eval_items"] != c["reference_eval_items"]


def test_rl_test_samples_answer_the_test_prompts_alone_more_often(tmp_path, artifacts,
                                                                  task_data):
    """``rollout.test_samples`` 3 in the RL module: each test prompt (the validation file
    again) has 3 answers, the first of them its one-answer validation's (sample 0 of the same
    stream), and the validation keeps one answer per prompt."""
    s = rl_summary("dvpo", tmp_path, artifacts, task_data, "--seed_everything=1",
                   "--model.init_args.rollout.eval_seed=11",
                   "--model.init_args.rollout.test_samples=3")
    check_items(s, 4)
    for items, one in ((s["test_eval_items"], s["final_eval_items"]),
                       (s["reference_test_eval_items"], s["reference_eval_items"])):
        assert all(len(v) == 3 for v in items["gold_reward"])
        assert all(not isinstance(v, list) for v in one["gold_reward"])
        assert [v[0] for v in items["gold_reward"]] == one["gold_reward"]
        assert [v[0] for v in items["response_len"]] == one["response_len"]


@pytest.mark.parametrize(("samples", "test_samples"), [(1, None), (3, None), (1, 3)])
def test_dpo_test_eval_with_common_random_numbers(samples, test_samples, task_data,
                                                  tokenizer_dir, sft_model_dir, tmp_path):
    """(``eval_samples`` 3: each prompt's values are its 3 answers'; ``test_samples`` 3: the
    test evaluation's alone, the validation keeps one answer per prompt)"""
    L.seed_everything(0, verbose=False)
    train = head_file(f"{task_data}/pairs.jsonl", tmp_path / "pairs16.jsonl", 16)
    dm = make_data(task_data, tokenizer_dir, train, batch_size=8)
    dm.test_path = f"{task_data}/eval_prompts.jsonl"  # (the first 8: the validation prompts)
    module = make_module(sft_model_dir, tokenizer_dir)
    module.rollout = type(module.rollout)(max_new_tokens=8, eval_seed=3, eval_samples=samples,
                                          test_samples=test_samples)
    build_trainer(tmp_path, max_steps=4, val_every=4).fit(module, dm)
    s = json.loads((tmp_path / "summary.json").read_text())
    check_items(s, 8)
    assert set(s["test_eval"]) == EVAL_KEYS
    if test_samples is None:
        assert s["test_eval_items"] == s["final_eval_items"]
        assert s["reference_test_eval_items"] == s["reference_eval_items"]
    else:
        assert all(len(v) == test_samples for v in s["test_eval_items"]["gold_reward"])
        assert all(len(v) == test_samples
                   for v in s["reference_test_eval_items"]["gold_reward"])
        assert all(not isinstance(v, list) for v in s["final_eval_items"]["gold_reward"])
    if samples > 1:
        assert all(len(v) == samples for v in s["test_eval_items"]["gold_reward"])


def test_a_missing_test_file_is_refused_before_training(task_data, tokenizer_dir):
    from dvpo_lightning.data.rollout import RolloutDataModule

    dm = RolloutDataModule(f"{task_data}/rl_prompts.jsonl", f"{task_data}/eval_prompts.jsonl",
                           tokenizer_dir, test_path=f"{task_data}/no_such_test.jsonl")
    with pytest.raises(FileNotFoundError, match="data.init_args.test_path"):
        dm.check_files()
    dpo = make_data(task_data, tokenizer_dir, f"{task_data}/pairs.jsonl", batch_size=8)
    dpo.test_path = f"{task_data}/no_such_test.jsonl"
    with pytest.raises(FileNotFoundError, match="data.init_args.test_path"):
        dpo.check_files()
