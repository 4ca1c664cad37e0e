"""Stage 2 through the real CLI: every RL config trains a tiny policy for two RL steps on CPU.

Each config (``configs/{dvpo,ppo,grpo,remax,rloo}.yaml``) is parsed by ``cli_main`` with only the
paths and sizes overridden, then fitted. Checked: metrics finite, every trainable parameter
changed, every frozen one (reference, GVM, reward model) bit-for-bit unchanged and in eval mode
throughout, the exported policy loads with ``transformers``, the run summary is written. Plus the
GVM versions, KL as a loss term with an adaptive coefficient, and the set-up errors.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, AutoTokenizer

from dvpo_lightning.commands.fit import cli_main
from dvpo_lightning.estimators import GVM
from dvpo_lightning.models import ValueModel, load_tokenizer
from dvpo_lightning.models.frozen_dtype import bf16_kernels

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MAX_NEW_TOKENS = 8


def _config(name: str) -> dict:
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


def make_cli(name: str, root: Path, art: SimpleNamespace, task_data: str, *extra: str,
             rl_steps: int = 2, ppo_epochs: int = 2, n_minibatches: int = 2,
             batch_size: int = 2):
    """``cli_main(run=False)`` on ``configs/{name}.yaml`` with tiny paths and sizes.

    ``trainer.max_steps`` counts RL steps (rollouts); ``extra`` overrides come last.

    Returns:
        ``(cli, max_steps)``.
    """
    init = _config(name)["model"]["init_args"]
    group = init["estimator"].get("init_args", {}).get("group_size", 1)
    responses = batch_size * group
    max_steps = rl_steps
    args = ["--config", str(CONFIGS / f"{name}.yaml"), f"--model.init_args.policy={art.policy}"]
    for key, path in (("value_model", art.gvm), ("reward_model", art.reward_model)):
        if key in init:
            args.append(f"--model.init_args.{key}={path}")
    args += [
        f"--data.init_args.train_path={task_data}/rl_prompts.jsonl",
        f"--data.init_args.eval_path={task_data}/eval_prompts.jsonl",
        "--data.init_args.test_path=null",  # (the configs name the study's test file)
        f"--data.init_args.tokenizer={task_data}/tokenizer",
        f"--data.init_args.batch_size={batch_size}",
        "--data.init_args.max_eval_prompts=4",
        f"--model.init_args.ppo.epochs={ppo_epochs}",
        f"--model.init_args.ppo.mini_batch_size={responses // n_minibatches}",
        f"--model.init_args.rollout.max_new_tokens={MAX_NEW_TOKENS}",
        f"--model.init_args.export_dir={root / 'policy'}",
        f"--trainer.default_root_dir={root}",
        f"--trainer.max_steps={max_steps}",
        f"--trainer.val_check_interval={rl_steps}",  # one evaluation, after the last RL step
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        *extra,
    ]
    return cli_main(args=args, run=False), max_steps


class FrozenProbe(Callback):
    """Records any frozen module in train mode or frozen parameter with ``requires_grad``, and
    whether the policy is in train mode after each update (it generates in eval mode)."""

    def __init__(self) -> None:
        self.violations: list[str] = []
        self.checks = 0

    def _check(self, module, where: str) -> None:
        self.checks += 1
        self.violations += [f"{where}: frozen.{n} in train mode"  # n == "": the container
                            for n, m in module.frozen.named_modules() if n and m.training]
        self.violations += [f"{where}: frozen.{n} requires grad"
                            for n, p in module.frozen.named_parameters() if p.requires_grad]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._check(pl_module, f"train batch {batch_idx} start")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._check(pl_module, f"train batch {batch_idx} end")
        if not pl_module.policy.training:
            self.violations.append(f"train batch {batch_idx}: policy left in eval mode")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                dataloader_idx=0) -> None:
        self._check(pl_module, f"validation batch {batch_idx}")


def fit(cli) -> dict[str, torch.Tensor]:
    """Fit with a :class:`FrozenProbe`; returns a copy of the state dict from before."""
    before = {k: v.detach().clone() for k, v in cli.model.state_dict().items()}
    probe = FrozenProbe()
    cli.trainer.callbacks.append(probe)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert probe.checks > 0 and probe.violations == [], probe.violations
    return before


def unchanged_trainable(module, before: dict) -> list[str]:
    params = [(n, p) for n, p in module.trained.named_parameters() if p.requires_grad]
    assert params, "nothing is trainable"
    return [n for n, p in params if torch.equal(before[f"trained.{n}"], p.detach())]


def changed_frozen(module, before: dict) -> list[str]:
    state = module.frozen.state_dict()
    assert state, "nothing is frozen"
    return [k for k, v in state.items() if not torch.equal(before[f"experience.frozen.{k}"], v)]


def finite_metrics(trainer) -> dict[str, float]:
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    assert not bad, f"non-finite metrics: {bad}"
    return metrics


# name -> estimator class, trained parts, frozen parts, metrics that must be logged
EXPECT = {
    "dvpo": ("GVM", {"policy"}, {"reference", "gvm"}, set()),
    "ppo": ("GAE", {"policy", "critic"}, {"reference", "reward_model"},
            {"train/value_loss", "critic/explained_variance", "rollout/score_mean"}),
    "grpo": ("GRPO", {"policy"}, {"reference", "reward_model"},
             {"rollout/score_mean", "train/kl_loss"}),
    "remax": ("ReMax", {"policy"}, {"reference", "reward_model"}, {"rollout/score_mean"}),
    "rloo": ("RLOO", {"policy"}, {"reference", "reward_model"}, {"rollout/score_mean"}),
}
COMMON_METRICS = {"train/policy_loss", "train/approx_kl", "train/clipfrac", "train/entropy",
                  "train/grad_norm", "rollout/kl_to_ref", "rollout/response_len", "adv/mean",
                  "rollout/gold_reward", "eval/gold_reward", "eval/kl_to_ref", "perf/step_s"}


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_config_trains_two_rl_steps(name, artifacts, task_data, tmp_path):
    estimator, trained, frozen, extra_metrics = EXPECT[name]
    cli, max_steps = make_cli(name, tmp_path, artifacts, task_data)
    module = cli.model
    assert type(module.estimator).__name__ == estimator
    assert set(module.trained) == trained and set(module.frozen) == frozen

    before = fit(cli)

    assert cli.trainer.global_step == max_steps == 2  # RL steps
    metrics = finite_metrics(cli.trainer)
    assert COMMON_METRICS | extra_metrics <= set(metrics), \
        sorted(COMMON_METRICS | extra_metrics - set(metrics))
    assert metrics["train/skipped_minibatches"] == 0
    assert 0 < metrics["rollout/response_len"] <= MAX_NEW_TOKENS

    assert unchanged_trainable(module, before) == []
    assert changed_frozen(module, before) == []
    policy, reference = module.policy.state_dict(), module.frozen["reference"].state_dict()
    assert policy.keys() == reference.keys()
    assert any(not torch.equal(policy[k], reference[k]) for k in policy), \
        "the reference must be a separate copy, not the trained policy"
    for name_, part in module.frozen.items():
        assert not part.training, name_
        assert not any(p.requires_grad for p in part.parameters()), name_

    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "policy"))
    for k, v in exported.state_dict().items():
        assert torch.equal(v, policy[k]), f"exported {k} differs from the trained policy"
    AutoTokenizer.from_pretrained(str(tmp_path / "policy"))
    meta = json.loads((tmp_path / "policy" / "dvpo_artifact.json").read_text())
    assert meta["kind"] == "policy" and meta["stage"] == "rl"

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["estimator"] == estimator
    # the SFT reference as RL step 0, then one evaluation after the second RL step
    assert [h["rl_step"] for h in summary["history"]] == [0, 2]
    assert summary["history"][0]["eval/kl_to_ref"] == 0.0
    assert summary["rl_steps"] == 2 and summary["cost"]["rl_steps"] == 2
    assert summary["cost"]["gen_tokens_per_step"] > 0 and summary["cost"]["step_s"] > 0
    assert summary["cost"]["params_trained_m"] * (2 if estimator == "ppo" else 1) \
        <= summary["cost"]["params_loaded_m"]
    assert math.isfinite(summary["final_eval"]["eval/gold_reward"])
    assert summary["reference_eval"] is not None


def test_gvm_versions_each_run_one_step(artifacts, task_data, tmp_path):
    adv = {}
    for version in ("paper", "value_difference", "code"):
        cli, _ = make_cli("dvpo", tmp_path / version, artifacts, task_data,
                          f"--model.init_args.estimator.init_args.version={version}",
                          rl_steps=1, ppo_epochs=1, n_minibatches=1)
        assert cli.model.estimator.version == version
        before = fit(cli)
        assert cli.trainer.global_step == 1
        metrics = finite_metrics(cli.trainer)
        assert unchanged_trainable(cli.model, before) == []
        assert changed_frozen(cli.model, before) == []
        adv[version] = (metrics["adv/mean"], metrics["adv/std"])
    # same seed, same rollout: only the advantage formula differs
    means = [m for m, _ in adv.values()]
    assert len({round(m, 6) for m in means}) == 3, adv
    mean, std = adv["code"]  # the authors' code whitens advantages over the batch
    assert abs(mean) < 1e-5 and 0.8 < std < 1.05, adv["code"]


def test_kl_as_loss_term_with_k3_and_adaptive_coef(artifacts, task_data, tmp_path, monkeypatch):
    seen = []
    original = GVM.__call__

    def spy(self, exp):
        seen.append(exp.kl_penalty.clone())
        return original(self, exp)

    monkeypatch.setattr(GVM, "__call__", spy)
    cli, _ = make_cli("dvpo", tmp_path, artifacts, task_data,
                      "--model.init_args.kl.where=loss", "--model.init_args.kl.estimator=k3",
                      "--model.init_args.kl.adaptive=true", "--model.init_args.kl.coef=0.05",
                      "--model.init_args.kl.target=6.0", "--model.init_args.kl.horizon=10")
    before = fit(cli)
    metrics = finite_metrics(cli.trainer)
    assert len(seen) == 2 and all((k == 0).all() for k in seen), "no KL in the reward"
    assert metrics["train/kl_loss"] > 0  # k3 >= 0, and > 0 once the policy has moved
    # KL far below its target: error clipped to -0.2, n = 2 responses, horizon 10, two RL steps
    assert cli.model.kl.coef == pytest.approx(0.05 * (1 - 0.2 * 2 / 10) ** 2, rel=1e-9)
    assert metrics["train/kl_coef"] == pytest.approx(cli.model.kl.coef, rel=1e-6)
    assert unchanged_trainable(cli.model, before) == []


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_group_estimators_sample_group_size_responses_per_prompt(name, artifacts, task_data,
                                                                 tmp_path):
    """The estimator's group_size is the only place it is stated: each prompt of the data's
    batch is sampled that many times, adjacent, with one group id per prompt."""
    cli, _ = make_cli(name, tmp_path, artifacts, task_data, batch_size=3)
    module, dm = cli.model, cli.datamodule
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["prompt_ids"].shape[0] == 3
    exp, _ = module.make_experience(batch, 1)
    group = module.estimator.group_size
    assert group == 4 and exp.batch_size == 3 * group
    assert exp.group_ids.tolist() == [i for i in range(3) for _ in range(group)]
    for i in range(3):
        rows = exp.prompt_ids[i * group:(i + 1) * group]
        assert (rows == batch["prompt_ids"][i]).all()


def test_mini_batch_size_must_divide_the_rollout_batch(artifacts, task_data, tmp_path):
    # refused from the config, before any model loads (commands/fit.py::check_rl_batch)
    with pytest.raises(ValueError, match=r"rollout batch \(4 responses.*multiple of "
                                         r"model.init_args.ppo.mini_batch_size \(3\)"):
        make_cli("dvpo", tmp_path, artifacts, task_data, "--data.init_args.batch_size=4",
                 "--model.init_args.ppo.mini_batch_size=3")
    # and by the module at fit start, for runs built without the CLI
    cli, _ = make_cli("dvpo", tmp_path, artifacts, task_data, "--data.init_args.batch_size=4")
    cli.model.ppo = replace(cli.model.ppo, mini_batch_size=3)
    with pytest.raises(ValueError, match=r"rollout batch \(4 responses.*multiple of "
                                         r"model.init_args.ppo.mini_batch_size \(3\)"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 0


def test_gvm_without_value_model_names_the_setting(artifacts, task_data, tmp_path):
    with pytest.raises(ValueError,
                       match=r"GVM needs a frozen GVM: set model.init_args.value_model"):
        make_cli("dvpo", tmp_path, artifacts, task_data, "--model.init_args.value_model=null")


def test_frozen_gvm_is_eval_and_without_grad(artifacts, task_data, tmp_path):
    cli, _ = make_cli("dvpo", tmp_path, artifacts, task_data)
    gvm = cli.model.frozen["gvm"]
    saved = ValueModel.from_pretrained(artifacts.gvm, load_tokenizer(artifacts.gvm))
    assert torch.equal(gvm.head.weight, saved.head.weight), "the GVM's trained head is loaded"
    assert not any(m.training for m in gvm.modules())
    assert not any(p.requires_grad for p in gvm.parameters())
    fit(cli)  # the probe checks eval mode and requires_grad at every batch
    assert not any(m.training for m in gvm.modules())
    assert not any(p.requires_grad for p in gvm.parameters())
    assert all(id(p) not in {id(q) for g in cli.model.optimizers().optimizer.param_groups
                             for q in g["params"]} for p in gvm.parameters())


def _policy_step_size(cli) -> float:
    before = {k: v.detach().clone() for k, v in cli.model.policy.state_dict().items()}
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    after = cli.model.policy.state_dict()
    return max(float((after[k] - before[k]).abs().max()) for k in before)


def test_gradient_clipping_is_applied(artifacts, task_data, tmp_path):
    """A tiny ``max_grad_norm`` shrinks every gradient below Adam's eps, so the first update
    is orders of magnitude smaller than unclipped; the logged norm is the pre-clip one."""
    sizes = {}
    for clip in ("null", "1e-12"):
        cli, _ = make_cli("dvpo", tmp_path / clip, artifacts, task_data,
                          f"--model.init_args.ppo.max_grad_norm={clip}", "--trainer.max_steps=1",
                          "--trainer.limit_val_batches=0", rl_steps=1, ppo_epochs=1,
                          n_minibatches=1)
        sizes[clip] = _policy_step_size(cli)
        assert float(cli.trainer.callback_metrics["train/grad_norm"]) > 1e-6
    assert sizes["null"] > 1e-5
    assert sizes["1e-12"] < sizes["null"] * 1e-2, sizes


def test_grad_accum_steps_once_per_accumulated_group(artifacts, task_data, tmp_path):
    """2 mini-batches accumulated into one optimizer step: one update per PPO epoch."""
    cli, _ = make_cli("dvpo", tmp_path, artifacts, task_data, "--model.init_args.ppo.grad_accum=2",
                      "--trainer.max_steps=-1", "--trainer.max_epochs=1",
                      "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=0",
                      ppo_epochs=2, n_minibatches=2)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 3  # RL steps
    adam = cli.model.optimizers().optimizer
    steps = {int(adam.state[p]["step"]) for g in adam.param_groups for p in g["params"]}
    assert steps == {3 * 2}  # 3 RL steps × 2 epochs × (2 mini-batches / 2)


def test_exploding_ratio_skips_every_minibatch(artifacts, task_data, tmp_path):
    """A threshold below 1 marks every mini-batch as exploding: nothing is stepped."""
    cli, _ = make_cli("dvpo", tmp_path, artifacts, task_data,
                      "--model.init_args.guards.ratio_skip_threshold=0.5", "--trainer.max_steps=-1",
                      "--trainer.max_epochs=1", "--trainer.limit_train_batches=1",
                      "--trainer.limit_val_batches=0", ppo_epochs=2, n_minibatches=2)
    before = {k: v.detach().clone() for k, v in cli.model.policy.state_dict().items()}
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 1  # the RL step counts; no optimizer step was taken
    assert not cli.model.optimizers().optimizer.state
    assert float(cli.trainer.callback_metrics["train/skipped_minibatches"]) == 4
    assert all(torch.equal(before[k], v) for k, v in cli.model.policy.state_dict().items())


def test_frozen_models_in_half_precision(artifacts, task_data, tmp_path):
    """``frozen_dtype=bfloat16`` keeps the reference and GVM in bf16 (half their memory) while
    the policy trains in fp32; the run's numbers stay finite."""
    cli, _ = make_cli("dvpo", tmp_path, artifacts, task_data,
                      "--model.init_args.models.frozen_dtype=bfloat16", rl_steps=1)
    cli.trainer.fit(cli.model, cli.datamodule)
    for name, part in cli.model.frozen.items():
        assert {p.dtype for p in part.parameters()} == {torch.bfloat16}, name
    assert {p.dtype for p in cli.model.trained.parameters()} == {torch.float32}
    assert all(math.isfinite(float(v)) for v in cli.trainer.logged_metrics.values())


def test_frozen_dtype_auto_is_bfloat16_where_the_device_has_its_kernels(artifacts, task_data,
                                                                         tmp_path, caplog):
    """``frozen_dtype=auto`` resolves on the run's device: bfloat16 where it multiplies
    bfloat16 in hardware (this CPU's AVX-512 BF16 / AMX, read from torch's own probes), the
    loaded float32 elsewhere; the start-up log says which and why."""
    has_kernels = bf16_kernels(torch.device("cpu")) is not None
    cli, _ = make_cli("dvpo", tmp_path, artifacts, task_data,
                      "--model.init_args.models.frozen_dtype=auto", rl_steps=1)
    assert {p.dtype for p in cli.model.frozen.parameters()} == {torch.float32}  # (until setup)
    with caplog.at_level(logging.INFO):
        cli.trainer.fit(cli.model, cli.datamodule)
    want = torch.bfloat16 if has_kernels else torch.float32
    for name, part in cli.model.frozen.items():
        assert {p.dtype for p in part.parameters()} == {want}, name
    assert {p.dtype for p in cli.model.trained.parameters()} == {torch.float32}
    said = "bfloat16 (model.init_args.models.frozen_dtype=auto: a CPU with" if has_kernels else \
        "their loaded dtype (model.init_args.models.frozen_dtype=auto: cpu has no bfloat16 kernels)"
    assert said in caplog.text


@pytest.mark.parametrize("name", ["ppo", "remax", "dvpo"])
def test_scoring_in_row_slices_gives_the_same_experience(name, artifacts, task_data, tmp_path):
    """``score_batch_size`` only bounds memory: log-probs, values, scores and the greedy
    baseline of a rollout scored 1 or 3 rows at a time equal the one-pass ones."""
    cli, _ = make_cli(name, tmp_path, artifacts, task_data, batch_size=4)
    module, dm = cli.model, cli.datamodule
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    fields = ("response_ids", "logp_old", "logp_ref", "values", "scores", "baseline_scores")
    runs = []
    for rows in (None, 1, 3):
        module.experience.settings = replace(module.experience.settings, score_batch_size=rows)
        torch.manual_seed(0)
        exp, _ = module.make_experience(batch, 1)
        runs.append({f: getattr(exp, f) for f in fields})
    assert runs[0]["response_ids"].shape[0] >= 4
    present = [f for f in fields if runs[0][f] is not None]
    assert {"logp_old", "logp_ref"} <= set(present) and len(present) >= 4, present
    for other in runs[1:]:
        for f in present:
            assert_close(other[f], runs[0][f], atol=1e-5, rtol=1e-5, msg=f)


@pytest.mark.parametrize("name", ["dvpo", "ppo"])
def test_an_on_policy_update_reuses_its_forward_for_logp_old(name, artifacts, task_data,
                                                              tmp_path):
    """One epoch, one mini-batch through the real experience maker: ``behaviour_logps: auto``
    runs the policy once per RL step fewer than ``rescore`` (the update's forward gives
    ``logp_old``), its logged ratio is exactly 1, and both train the same weights."""
    runs = {}
    for mode in ("auto", "rescore"):
        torch.manual_seed(0)
        cli, steps = make_cli(name, tmp_path / mode, artifacts, task_data,
                              f"--model.init_args.ppo.behaviour_logps={mode}", ppo_epochs=1,
                              n_minibatches=1)
        calls = []
        # (every pass of the policy, generation's decode steps too, embeds its input)
        cli.model.policy.get_input_embeddings().register_forward_hook(
            lambda *_: calls.append(1))
        fit(cli)
        runs[mode] = (len(calls), {n: p.detach() for n, p in cli.model.trained.named_parameters()},
                      float(cli.trainer.callback_metrics["train/clipfrac"]))
    assert runs["rescore"][0] - runs["auto"][0] == steps, (runs["rescore"][0], runs["auto"][0])
    assert runs["auto"][2] == 0.0  # (ratio 1: nothing clipped)
    for n, p in runs["auto"][1].items():
        assert_close(p, runs["rescore"][1][n], atol=1e-5, rtol=1e-4, msg=n)


def test_score_batch_size_below_one_is_refused(artifacts, task_data, tmp_path):
    with pytest.raises(ValueError, match="score_batch_size must be >= 1"):
        make_cli("dvpo", tmp_path, artifacts, task_data,
                 "--model.init_args.rollout.score_batch_size=0")
