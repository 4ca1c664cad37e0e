"""Judges named in a config: the registry's embedded scorers and a user's ``module:function``,
with one error naming the judge and the row when a judge misbehaves."""

from __future__ import annotations

import pytest

from dvpo_lightning.tasks import SortingTask
from dvpo_lightning.tasks.judges import JUDGES, load_judge, register_judge

USER_JUDGES = '''
def by_length(prompt, response):
    return len(response) / 10

def with_finished(prompt, response, finished=True):
    return 1.0 if finished else 0.0

def broken(prompt, response):
    raise KeyError("no score for " + prompt)

def wordy(prompt, response):
    return "good"

def undefined(prompt, response):
    return float("nan")

class Counter:
    def __call__(self, prompt, response):
        return response.count("a")
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_judges.py").write_text(USER_JUDGES)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_judges"


def test_the_embedded_tasks_are_registry_entries_scoring_as_their_task():
    assert {"sorting", "instruct"} <= set(JUDGES)
    judge = load_judge("sorting")
    task = SortingTask()
    for prompt, response, finished in (("3172=", "1237", True), ("3172=", "1273", True),
                                       ("3172=", "12", False)):
        assert judge.score(prompt, response, finished, row=0) == task.gold_score(
            prompt, response, finished)


def test_a_users_function_is_named_by_its_import_path(user_module):
    judge = load_judge(f"{user_module}:by_length")
    assert not judge.takes_finished and judge.score("p", "abcde", False, row=3) == 0.5
    judge = load_judge(f"{user_module}:with_finished")
    assert judge.takes_finished and judge.score("p", "x", False, row=0) == 0.0
    assert load_judge(f"{user_module}:Counter").score("p", "banana", True, row=0) == 3.0


def test_a_registered_judge_is_found_by_name():
    register_judge("test-constant", lambda: (lambda prompt, response: 7))
    try:
        assert load_judge("test-constant").score("p", "r", True, row=0) == 7.0
    finally:
        JUDGES.pop("test-constant")


@pytest.mark.parametrize("name, message", [
    ("broken", r"the judge 'my_judges:broken' raised KeyError: 'no score for hello' on row 5"),
    ("wordy", r"the judge 'my_judges:wordy' returned 'good' \(str\) on row 5"),
    ("undefined", r"the judge 'my_judges:undefined' returned nan \(float\) on row 5"),
])
def test_a_judge_that_raises_or_returns_a_non_number_is_one_error_naming_it_and_the_row(
        user_module, name, message):
    judge = load_judge(f"{user_module}:{name}")
    with pytest.raises(ValueError, match=message) as err:
        judge.score("hello", "world", True, row=5)
    assert "model.init_args.judge" in str(err.value) and "Fix" in str(err.value)


@pytest.mark.parametrize("spec, message", [
    ("nonesuch", r"neither a registered judge \(.*sorting.*\) nor a 'package.module:function'"),
    ("no_such_module_xyz:f", r"cannot import 'no_such_module_xyz'"),
    ("my_judges:missing", r"'my_judges' has no 'missing'"),
    ("my_judges:USER", r"is not callable"),
])
def test_a_judge_that_cannot_be_found_names_the_key_and_the_fix(user_module, spec, message):
    if spec == "my_judges:USER":
        import my_judges

        my_judges.USER = 3
    with pytest.raises(ValueError, match=message) as err:
        load_judge(spec)
    assert str(err.value).startswith(f"model.init_args.judge={spec!r}")


SORTED_JUDGE = '''
def sorted_digits(prompt, response):
    digits = prompt.rstrip("=")
    return float(response == "".join(sorted(digits)))

def broken(prompt, response):
    raise KeyError("no score for " + prompt)
'''


def test_an_rl_run_is_judged_by_a_users_function(artifacts, task_data, tmp_path, monkeypatch):
    """``judge: my_judge:sorted_digits`` scores the rollouts and the held-out answers (gold
    reward, win rate against the reference); no exact-answer rate, which only an embedded
    task's scale defines."""
    from test_rl_training import make_cli

    (tmp_path / "my_judge.py").write_text(SORTED_JUDGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    cli, _ = make_cli("dvpo", tmp_path, artifacts, task_data,
                      "--model.init_args.judge=my_judge:sorted_digits")
    cli.trainer.fit(cli.model, cli.datamodule)
    final = cli.model.evals.rows[-1]
    assert {"eval/gold_reward", "eval/win_rate_vs_ref"} <= set(final)
    assert "eval/exact" not in final and 0.0 <= final["eval/gold_reward"] <= 1.0
    assert "rollout/gold_reward" in cli.trainer.callback_metrics


def test_a_judge_that_fails_in_a_run_stops_it_naming_the_judge_and_row(artifacts, task_data,
                                                                        tmp_path, monkeypatch):
    from test_rl_training import make_cli

    (tmp_path / "my_judge.py").write_text(SORTED_JUDGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    cli, _ = make_cli("dvpo", tmp_path, artifacts, task_data,
                      "--model.init_args.judge=my_judge:broken")
    with pytest.raises(ValueError, match=r"judge 'my_judge:broken' raised KeyError: .* on row 0"):
        cli.trainer.fit(cli.model, cli.datamodule)


def test_an_unknown_judge_is_refused_before_any_model_loads(artifacts, task_data, tmp_path,
                                                            monkeypatch):
    from test_rl_training import make_cli

    import dvpo_lightning.modules.dvpo as dvpo

    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded before the judge was checked")

    monkeypatch.setattr(dvpo, "load_rl_models", no_models)
    with pytest.raises(ValueError, match=r"model.init_args.judge='sortin' is neither"):
        make_cli("dvpo", tmp_path, artifacts, task_data, "--model.init_args.judge=sortin")
