"""Numerical guards: a NaN planted in the reward, the logits or a gradient stops the run with a
message naming the step, the tensor and the likely cause, and leaves the last checkpoint good;
``guards.on_nonfinite=skip`` skips the step instead; ``kl.bound`` stops or warns."""

from __future__ import annotations

import math

import pytest
import torch
from test_rl_training import make_cli

from dvpo_lightning.callbacks import CostMeter
from dvpo_lightning.runtime.guards import KLBoundError, NonFiniteError, nonfinite_names

NAN = float("nan")


def rl(name, root, artifacts, task_data, *extra, rl_steps=3):
    cli, _ = make_cli(name, root, artifacts, task_data, "--trainer.enable_checkpointing=true",
                      "--trainer.val_check_interval=1", *extra, rl_steps=rl_steps)
    return cli


def in_second_rollout(module) -> bool:
    """True while the module trains on its second RL step (not during evaluation)."""
    return module.training and module.global_step == 1  # (global_step counts RL steps)


def plant_reward(module) -> None:
    rm = module.frozen["reward_model"]
    forward = rm.forward

    def nan_scores(*args, **kwargs):
        out = forward(*args, **kwargs)
        return out * NAN if in_second_rollout(module) else out

    rm.forward = nan_scores


def plant_logits(module) -> None:
    def hook(_mod, _inp, out):
        if in_second_rollout(module):
            out.logits = out.logits * NAN
        return out

    module.policy.register_forward_hook(hook)


def plant_gradient(module) -> None:
    p = next(module.policy.parameters())
    p.register_hook(lambda g: g * NAN if in_second_rollout(module) else g)


def last_checkpoint_step(root) -> int:
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    for k, v in ckpt["state_dict"].items():
        assert torch.isfinite(v).all(), f"{k} is not finite in the last checkpoint"
    return ckpt["global_step"]


@pytest.mark.parametrize("name,plant,tensor,cause", [
    ("grpo", plant_reward, "scores", "the reward model's scores"),
    ("dvpo", plant_logits, "logits", "the policy's logits are NaN / inf"),
    ("dvpo", plant_gradient, "grad_norm", "exploding gradients"),
])
def test_a_planted_nan_stops_the_run(name, plant, tensor, cause, tmp_path, artifacts,
                                     task_data):
    cli = rl(name, tmp_path, artifacts, task_data)
    plant(cli.model)
    with pytest.raises(NonFiniteError) as e:
        cli.trainer.fit(cli.model, cli.datamodule)
    msg = str(e.value)
    assert f"non-finite values (NaN or inf) in {tensor}" in msg
    assert "at RL step 2" in msg and cause in msg
    assert "on_nonfinite=skip" in msg  # the alternative is named
    assert last_checkpoint_step(tmp_path) == 1  # the good step-1 checkpoint is intact
    assert not (tmp_path / "policy").exists()  # nothing exported after the failure


def test_skip_mode_skips_the_bad_step_and_goes_on(tmp_path, artifacts, task_data):
    cli = rl("grpo", tmp_path, artifacts, task_data, "--model.init_args.guards.on_nonfinite=skip")
    plant_reward(cli.model)
    with pytest.warns(UserWarning, match="non-finite values .* in scores .* skipping it"):
        cli.trainer.fit(cli.model, cli.datamodule)
    m = cli.model
    # a skipped rollout is an RL step (its prompts are consumed), not a record of the curve
    assert m.guard.skips == 1 and cli.trainer.global_step == 3
    meter = next(cb for cb in cli.trainer.callbacks if isinstance(cb, CostMeter))
    assert len(meter.records) == 2
    for p in m.trained.parameters():
        assert torch.isfinite(p).all()
    assert cli.trainer.logged_metrics["guard/skipped_steps"] == 1.0


def test_kl_bound_stops_or_warns(tmp_path, artifacts, task_data):
    # RL step 1 starts from the reference (KL 0); after one update the KL is positive. k3
    # (≥ 0 per token, > 0 where the policy moved): k1's sample mean can fall below 0 on one
    # rollout, and whether it does hangs on the random draws, not on the bound
    k3 = "--model.init_args.kl.estimator=k3"
    cli = rl("dvpo", tmp_path / "stop", artifacts, task_data, "--model.init_args.kl.bound=1e-9",
             k3)
    with pytest.raises(KLBoundError, match=r"exceeds model.init_args.kl.bound=1e-09.*Raise "
                                           r"model.init_args.kl.coef"):
        cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 1
    cli = rl("dvpo", tmp_path / "warn", artifacts, task_data, "--model.init_args.kl.bound=1e-9",
             "--model.init_args.kl.on_exceeded=warn", k3)
    with pytest.warns(UserWarning, match="kl.on_exceeded=warn: going on"):
        cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 3


def test_guard_options_are_validated(tmp_path, artifacts, task_data, capsys):
    with pytest.raises(SystemExit):
        rl("dvpo", tmp_path, artifacts, task_data, "--model.init_args.guards.on_nonfinite=ignore")
    err = capsys.readouterr().err
    assert "guards.on_nonfinite" in err and "Literal['stop', 'skip']" in err and "ignore" in err


def test_nonfinite_names_ignores_padding():
    t = torch.tensor([[1.0, NAN], [2.0, 3.0]])
    mask = torch.tensor([[True, False], [True, True]])
    assert nonfinite_names({"a": t}, {"a": mask}) == []
    assert nonfinite_names({"a": t, "b": None, "c": torch.tensor([math.inf])}) == ["a", "c"]
