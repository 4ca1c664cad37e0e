"""Semi-online DVPO through the real CLI: an RL run that refreshes its GVM trains it within
the label budget and exports it; N steps ≡ N/2 + resume + N/2 with refreshes in both halves;
with the refresh off the run is the frozen-GVM run to the last digit. PPO refreshes its reward
model from the same kind of labels, on the Bradley–Terry loss with its stage-1 pairs replayed."""

from __future__ import annotations

import json

import torch
from test_resume import _curve, _rl, _trained
from test_rl_training import make_cli

from dvpo_lightning.models import ValueModel, load_tokenizer


def refresh_args(task_data: str, every: int = 1, budget: int = 10,
                 replay: str = "trajectories") -> list[str]:
    k = "--model.init_args.refresh"
    return [f"{k}.every={every}", f"{k}.labels=4", f"{k}.budget={budget}", f"{k}.steps=2",
            f"{k}.batch_size=4", f"{k}.replay=0.5", f"{k}.replay_path={task_data}/{replay}.jsonl"]


def _gvm(cli) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in cli.model.frozen["gvm"].state_dict().items()}


def test_a_refreshing_run_trains_its_gvm_within_the_budget_and_exports_it(
        tmp_path, artifacts, task_data):
    cli, _ = make_cli("dvpo", tmp_path, artifacts, task_data, *refresh_args(task_data),
                      rl_steps=3)
    gvm0, ref0, pol0 = _gvm(cli), cli.model.frozen["reference"].state_dict(), _trained(cli)
    ref0 = {k: v.clone() for k, v in ref0.items()}
    cli.trainer.fit(cli.model, cli.datamodule)
    gvm1 = _gvm(cli)
    assert any(not torch.equal(gvm0[k], gvm1[k]) for k in gvm0)  # refreshed
    assert all(torch.equal(v, cli.model.frozen["reference"].state_dict()[k])
               for k, v in ref0.items())  # the reference stays frozen
    assert any(not torch.equal(v, _trained(cli)[k]) for k, v in pol0.items())
    assert not any(p.requires_grad for p in cli.model.frozen.parameters())
    summary = json.loads((tmp_path / "summary.json").read_text())
    r = summary["refresh"]
    assert r["labels_used"] == 10 and r["refreshes"] == 3  # 4 + 4 + what is left: 2
    assert [h["step"] for h in r["history"]] == [1.0, 2.0, 3.0]
    assert all(0.0 <= h["refresh/pair_acc_after"] <= 1.0 for h in r["history"]
               if h["refresh/pairs"])
    assert len(cli.model.refresher.buffer) == 10
    exported = ValueModel.from_pretrained(str(tmp_path / "policy" / "gvm"),
                                          load_tokenizer(str(tmp_path / "policy")))
    assert all(torch.equal(v, gvm1[k]) for k, v in exported.state_dict().items())


def test_refresh_off_is_the_frozen_run_to_the_last_digit(tmp_path, artifacts, task_data):
    off = ["--model.init_args.refresh.every=0", "--model.init_args.refresh.labels=6"]
    runs = {}
    for name, extra in (("plain", []), ("off", off)):
        cli, _ = make_cli("dvpo", tmp_path / name, artifacts, task_data, *extra, rl_steps=2)
        cli.trainer.fit(cli.model, cli.datamodule)
        assert cli.model.refresher is None
        runs[name] = (_trained(cli), _curve(tmp_path / name))
    (w_a, c_a), (w_b, c_b) = runs["plain"], runs["off"]
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)
    assert c_a == c_b  # the evaluation history and the per-step curve


def test_a_refreshing_run_resumes_exactly(tmp_path, artifacts, task_data):
    """4 RL steps with a refresh after each ≡ 2 steps + resume from last.ckpt + 2: the policy,
    the refreshed GVM, the labelled buffer, the curves and the refresh log are equal."""
    extra = ("--model.init_args.kl.adaptive=true", *refresh_args(task_data, budget=100))
    full, _ = _rl("dvpo", tmp_path / "full", artifacts, task_data, 4, 2, *extra)
    full.trainer.fit(full.model, full.datamodule)
    half, _ = _rl("dvpo", tmp_path / "half", artifacts, task_data, 2, 2, *extra)
    half.trainer.fit(half.model, half.datamodule)
    last = tmp_path / "half" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert len(saved["rl_state"]["refresh"]["buffer"]["rows"]) == 8
    assert any(k.startswith("experience.frozen.gvm.") for k in saved["state_dict"])
    assert not any(k.startswith("experience.frozen.reference.") for k in saved["state_dict"])
    resumed, _ = _rl("dvpo", tmp_path / "half", artifacts, task_data, 4, 2, *extra)
    resumed.trainer.fit(resumed.model, resumed.datamodule, ckpt_path=str(last))
    for a, b in ((_trained(full), _trained(resumed)), (_gvm(full), _gvm(resumed))):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    assert _curve(tmp_path / "full") == _curve(tmp_path / "half")
    rf, rr = full.model.refresher, resumed.model.refresher
    assert rf.buffer.rows == rr.buffer.rows and len(rf.buffer) == 16
    strip = [{k: v for k, v in h.items() if not k.endswith("_s") and k != "refresh/seconds"}
             for h in rf.history]
    assert strip == [{k: v for k, v in h.items() if not k.endswith("_s")
                      and k != "refresh/seconds"} for h in rr.history]


def test_ppo_refreshes_its_reward_model_from_the_same_labels(tmp_path, artifacts, task_data):
    cli, _ = make_cli("ppo", tmp_path, artifacts, task_data,
                      *refresh_args(task_data, replay="pairs"), rl_steps=2)
    frozen = cli.model.frozen
    assert "gvm" not in frozen and cli.model.refresher.role == "reward_model"
    rm0 = {k: v.clone() for k, v in frozen["reward_model"].state_dict().items()}
    ref0 = {k: v.clone() for k, v in frozen["reference"].state_dict().items()}
    critic0 = {k: v.clone() for k, v in cli.model.critic.state_dict().items()}
    assert len(cli.model.refresher.replay) == 0  # (the replay is read at set-up)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert len(cli.model.refresher.replay[0]) == 3  # (prompt, chosen, rejected) pairs
    rm1 = frozen["reward_model"].state_dict()
    assert any(not torch.equal(rm0[k], rm1[k]) for k in rm0)
    assert all(torch.equal(v, frozen["reference"].state_dict()[k]) for k, v in ref0.items())
    assert any(not torch.equal(v, cli.model.critic.state_dict()[k]) for k, v in critic0.items())
    r = json.loads((tmp_path / "summary.json").read_text())["refresh"]
    assert r["model"] == "reward_model" and r["labels_used"] == 8 and r["refreshes"] == 2
    exported = ValueModel.from_pretrained(str(tmp_path / "policy" / "reward_model"),
                                          load_tokenizer(str(tmp_path / "policy")))
    assert all(torch.equal(v, rm1[k]) for k, v in exported.state_dict().items())


def test_a_failing_labeller_stops_the_run_and_the_resume_keeps_every_label(
        tmp_path, artifacts, task_data, monkeypatch):
    """Two refreshes, a checkpoint; the third refresh's labeller fails: one error naming it,
    the step and the fix, and last.ckpt still holds the first eight labels; resumed with a
    labeller that works, the run ends with those eight and eight more."""
    import pytest

    from dvpo_lightning.refresh import LabellerError

    (tmp_path / "flaky_labels.py").write_text(
        "def broken(prompt, response):\n    raise RuntimeError('annotator offline')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    extra = refresh_args(task_data, budget=100)
    first, _ = _rl("dvpo", tmp_path / "run", artifacts, task_data, 2, 2, *extra)
    first.trainer.fit(first.model, first.datamodule)
    bought = list(first.model.refresher.buffer.rows)
    assert len(bought) == 8
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    failing, _ = _rl("dvpo", tmp_path / "run", artifacts, task_data, 4, 2, *extra,
                     "--model.init_args.refresh.labeller=flaky_labels:broken")
    with pytest.raises(LabellerError, match=r"the labeller 'flaky_labels:broken' raised "
                       r"RuntimeError: annotator offline on row 0 of the refresh after RL step 3"
                       r".*--ckpt_path last"):
        failing.trainer.fit(failing.model, failing.datamodule, ckpt_path=str(last))
    saved = torch.load(last, weights_only=True)["rl_state"]["refresh"]
    assert len(saved["buffer"]["rows"]) == 8 and saved["labels_used"] == 8
    resumed, _ = _rl("dvpo", tmp_path / "run", artifacts, task_data, 4, 2, *extra)
    resumed.trainer.fit(resumed.model, resumed.datamodule, ckpt_path=str(last))
    rows = resumed.model.refresher.buffer.rows
    assert rows[:8] == bought and len(rows) == 16
    assert [r.step for r in rows] == [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4
