"""The RL step without the world: ``DVPOModule.from_parts`` around a tiny in-memory policy and a
stand-in experience source, driven by a real Lightning ``Trainer`` in well under a second.

Checked: the first update follows the policy gradient computed independently from the PPO loss;
every trainable parameter moves and the frozen reference does not; ``trainer.global_step``
counts RL steps while the optimizer steps ``steps × epochs × mini-batches / grad_accum`` times;
the guards skip (or stop on) a non-finite rollout and a runaway ratio; β acts on the reward or
on the loss as configured; and the experience maker fetches exactly what each estimator needs.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn
from transformers import PretrainedConfig

from dvpo_lightning.estimators import (
    GAE,
    GRPO,
    GVM,
    REINFORCEPP,
    RLOO,
    REINFORCEPPBaseline,
    ReMax,
)
from dvpo_lightning.modules.dvpo import DVPOModule
from dvpo_lightning.modules.kl_penalty import KLSettings
from dvpo_lightning.modules.optim import RLOptimSettings
from dvpo_lightning.modules.ppo import PPOSettings
from dvpo_lightning.ops.losses import ppo_clip_loss
from dvpo_lightning.rollout.experience import Experience, Need
from dvpo_lightning.rollout.experience_maker import ExperienceMaker
from dvpo_lightning.rollout.generation import HFGenerator, Samples
from dvpo_lightning.rollout.scoring import policy_logps
from dvpo_lightning.rollout.settings import RolloutSettings
from dvpo_lightning.runtime.guards import GuardSettings, NonFiniteError

V, H, B, P, T = 11, 8, 4, 3, 5  # vocabulary, hidden, responses, prompt and response widths
EOS, PAD = 1, 0


class TinyLM(nn.Module):
    """Embedding → linear head: a causal LM as :func:`policy_logps` calls one."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.config = PretrainedConfig()
        self.embed = nn.Embedding(V, H)
        self.head = nn.Linear(H, V)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        return SimpleNamespace(logits=self.head(torch.tanh(self.embed(input_ids))))


class TinyValue(nn.Module):
    """``(ids, mask) ↦ (B, L)`` one value per position, as a value model."""

    def __init__(self, seed: int = 1) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.config = PretrainedConfig()
        self.embed = nn.Embedding(V, 1)

    def forward(self, input_ids, attention_mask):
        return self.embed(input_ids).squeeze(-1)


def fixed_rollout(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(2, V, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.bool)
    response_ids = torch.randint(2, V, (B, T), generator=g)
    lengths = torch.tensor([5, 3, 4, 2])
    response_mask = torch.arange(T)[None] < lengths[:, None]
    response_ids[torch.arange(B), lengths - 1] = EOS
    response_ids = response_ids.masked_fill(~response_mask, PAD)
    return prompt_ids, prompt_mask, response_ids, response_mask


class FakeSource(ExperienceMaker):
    """A stand-in experience source: the same responses every step, scored by the policy
    (``logp_old``), a frozen reference copy and fixed GVM values; NaN values at ``nan_step``.
    Everything but the rollout (``forward``) is the real experience maker's."""

    def __init__(self, policy: nn.Module, nan_step: int | None = None) -> None:
        super().__init__(frozenset({Need.GVM_VALUES}), 1,
                         nn.ModuleDict({"reference": copy.deepcopy(policy).requires_grad_(False)}),
                         HFGenerator(EOS, PAD), RolloutSettings(max_new_tokens=T),
                         SimpleNamespace(eos_token_id=EOS, pad_token_id=PAD))
        self.seq = fixed_rollout()
        self.values = torch.randn(B, T + 1, generator=torch.Generator().manual_seed(3))
        self.nan_step, self.calls = nan_step, 0

    @torch.no_grad()
    def forward(self, policy, batch, critic=None, weights_version=None,
                behaviour=None) -> tuple[Experience, dict]:
        self.calls += 1
        values = self.values * (math.nan if self.calls == self.nan_step else 1.0)
        logp_old = (behaviour(*self.seq) if behaviour is not None else
                    policy_logps(policy, *self.seq)[0])
        exp = Experience(*self.seq, logp_old,
                         policy_logps(self.frozen["reference"], *self.seq)[0], values=values)
        return exp, {"generate_s": 0.0, "score_s": 0.0, "gold": None}


def prompt_batches(n: int = 8):
    return [{"prompts": ["x"] * B, "prompt_ids": torch.zeros(1)} for _ in range(n)]


def module_and_source(**settings) -> tuple[DVPOModule, FakeSource]:
    torch.manual_seed(0)
    policy = TinyLM()
    source = FakeSource(policy, settings.pop("nan_step", None))
    module = DVPOModule.from_parts(nn.ModuleDict({"policy": policy}), source,
                                   GVM(version="value_difference"), **settings)
    return module, source


def fit(module: DVPOModule, steps: int, root) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, default_root_dir=root,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(
        prompt_batches(), batch_size=None))
    return trainer


def adam_steps(module: DVPOModule) -> set[int]:
    opt = module.optimizers().optimizer
    return {int(opt.state[p]["step"]) for g in opt.param_groups for p in g["params"]
            if p in opt.state}


def test_first_update_follows_the_policy_gradient(tmp_path):
    """One epoch, one mini-batch, Adam's first step: ``Δθ = −lr·g/(|g| + ε)``, so every weight
    moves against the sign of the PPO loss gradient at ratio 1, computed here independently."""
    lr = 1e-3
    module, source = module_and_source(optim=RLOptimSettings(lr=lr),
                                       ppo=PPOSettings(epochs=1, max_grad_norm=None))
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    exp, _ = source(module.policy, None)
    exp, _ = module.kl.in_reward(exp)
    adv, _ = module.estimator(exp)
    logp, _ = policy_logps(module.policy, *source.seq)
    loss, _ = ppo_clip_loss(logp, exp.logp_old, adv, exp.response_mask)
    grads = torch.autograd.grad(loss, list(module.policy.parameters()))
    source.calls = 0

    fit(module, 1, tmp_path)

    for (name, p), g in zip(module.policy.named_parameters(), grads):
        delta = p.detach() - before[name]
        big = g.abs() > 1e-6
        assert big.any(), name
        torch.testing.assert_close(delta[big], -lr * g[big].sign(), atol=lr * 1e-3, rtol=0)


class ForwardCounter:
    """Counts the forward passes of a module (a forward hook: the real module runs)."""

    def __init__(self, module: nn.Module) -> None:
        self.n = 0
        module.register_forward_hook(lambda *_: setattr(self, "n", self.n + 1))


def test_an_on_policy_update_takes_logp_old_from_its_own_forward(tmp_path):
    """One epoch, one mini-batch: ``behaviour_logps: auto`` runs the policy once per RL step
    (the update's forward gives ``logp_old``, detached) where ``rescore`` runs it twice, and
    both train the same weights. With two epochs ``auto`` rescoring is the only way."""
    runs = {}
    for mode, epochs in (("auto", 1), ("rescore", 1), ("auto", 2)):
        module, _ = module_and_source(optim=RLOptimSettings(lr=1e-2), ppo=PPOSettings(epochs=epochs,
                                                               behaviour_logps=mode))
        counter = ForwardCounter(module.policy)
        fit(module, 3, tmp_path / f"{mode}{epochs}")
        runs[mode, epochs] = (counter.n, {n: p.detach() for n, p in module.named_parameters()})
    assert runs["auto", 1][0] == 3 * 1 and runs["rescore", 1][0] == 3 * 2
    assert runs["auto", 2][0] == 3 * (1 + 2)  # (rescored, then one forward per epoch)
    for name, p in runs["auto", 1][1].items():
        torch.testing.assert_close(p, runs["rescore", 1][1][name], rtol=1e-6, atol=1e-7)
    assert PPOSettings(epochs=1, mini_batch_size=4).on_policy(4)
    assert not PPOSettings(epochs=1, mini_batch_size=2).on_policy(4)
    assert not PPOSettings(epochs=1, mini_batch_size=4, grad_accum=2).on_policy(4)


def test_rl_steps_are_the_global_step_and_every_trainable_weight_moves(tmp_path):
    module, source = module_and_source(ppo=PPOSettings(epochs=2, mini_batch_size=2),
                                       optim=RLOptimSettings(lr=1e-2))
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = fit(module, 3, tmp_path)
    assert trainer.global_step == 3 and source.calls == 3  # RL steps (rollouts)
    assert adam_steps(module) == {3 * 2 * 2}  # steps × epochs × mini-batches
    for n, p in module.named_parameters():
        moved = not torch.equal(before[n], p.detach())
        assert moved == n.startswith("trained."), n  # the frozen reference never moves
    assert not any(p.requires_grad for p in module.frozen.parameters())


def test_grad_accum_steps_once_per_accumulated_group(tmp_path):
    module, _ = module_and_source(ppo=PPOSettings(epochs=2, mini_batch_size=1, grad_accum=2))
    fit(module, 2, tmp_path)
    assert adam_steps(module) == {2 * 2 * (4 // 2)}  # steps × epochs × (4 mini-batches / 2)


def test_a_non_finite_rollout_is_skipped_or_stops_the_run(tmp_path):
    module, source = module_and_source(nan_step=2, guards=GuardSettings(on_nonfinite="skip"),
                                       ppo=PPOSettings(epochs=1))
    with pytest.warns(UserWarning, match=r"non-finite values .* in values .* RL step 2"):
        trainer = fit(module, 3, tmp_path)
    assert trainer.global_step == 3 and module.guard.skips == 1
    assert adam_steps(module) == {2}  # the skipped rollout made no update
    assert all(torch.isfinite(p).all() for p in module.parameters())

    module, _ = module_and_source(nan_step=2, ppo=PPOSettings(epochs=1))
    with pytest.raises(NonFiniteError, match=r"in values during the rollout at RL step 2"):
        fit(module, 3, tmp_path)
    assert adam_steps(module) == {1}


def test_a_runaway_ratio_skips_the_mini_batch(tmp_path):
    module, _ = module_and_source(guards=GuardSettings(ratio_skip_threshold=0.5),
                                  ppo=PPOSettings(epochs=2, mini_batch_size=2))
    trainer = fit(module, 1, tmp_path)
    assert trainer.global_step == 1 and adam_steps(module) == set()
    assert float(trainer.callback_metrics["train/skipped_minibatches"]) == 4


@pytest.mark.parametrize("where", ["reward", "loss"])
def test_beta_acts_on_the_reward_or_on_the_loss(where, monkeypatch, tmp_path):
    seen = []
    original = GVM.__call__
    monkeypatch.setattr(GVM, "__call__", lambda self, exp: seen.append(exp) or original(self, exp))
    module, _ = module_and_source(kl=KLSettings(coef=0.5, where=where, estimator="k3"),
                                  ppo=PPOSettings(epochs=1))
    trainer = fit(module, 2, tmp_path)
    penalty = seen[-1].kl_penalty
    if where == "reward":  # β·k3 per token, from the second step on (the first has KL 0)
        kl = module.kl.per_token(seen[-1].logp_old, seen[-1].logp_ref, seen[-1].response_mask)
        torch.testing.assert_close(penalty, 0.5 * kl)
        assert penalty.abs().sum() > 0 and "train/kl_loss" not in trainer.callback_metrics
    else:
        assert (penalty == 0).all() and float(trainer.callback_metrics["train/kl_loss"]) > 0


class FakeGenerator(HFGenerator):
    """Fixed responses; the greedy (ReMax baseline) ones differ from the sampled ones."""

    name = "fake"

    def __init__(self) -> None:
        super().__init__(EOS, PAD)

    def generate(self, model, prompt_ids, prompt_mask, cfg, weights_version=None):
        _, _, resp, mask = fixed_rollout(seed=1 if cfg.greedy else 0)
        n = prompt_ids.shape[0]
        return Samples(resp[:1].repeat(n, 1), mask[:1].repeat(n, 1), None)


@pytest.mark.parametrize("estimator", [GVM(), GAE(), GRPO(group_size=2), RLOO(group_size=2),
                                       ReMax(), REINFORCEPP(),
                                       REINFORCEPPBaseline(group_size=2)],
                         ids=lambda e: type(e).__name__)
def test_the_experience_maker_fetches_exactly_what_the_estimator_needs(estimator):
    needs = estimator.needs
    frozen = nn.ModuleDict({"reference": TinyLM(seed=5)})
    if Need.GVM_VALUES in needs:
        frozen["gvm"] = TinyValue(seed=2)
    if Need.SCORES in needs or Need.GREEDY_BASELINE in needs:
        frozen["reward_model"] = TinyValue(seed=3)
    maker = ExperienceMaker(needs, estimator.group_size, frozen, FakeGenerator(),
                            RolloutSettings(max_new_tokens=T),
                            SimpleNamespace(eos_token_id=EOS, pad_token_id=PAD))
    prompts = fixed_rollout()[:2]
    batch = {"prompt_ids": prompts[0][:2], "prompt_mask": prompts[1][:2], "prompts": ["a", "b"]}
    exp, info = maker(TinyLM(), batch, critic=TinyValue(seed=4))
    fields = {"values": Need.GVM_VALUES in needs or Need.CRITIC_VALUES in needs,
              "scores": Need.SCORES in needs, "group_ids": Need.GROUPS in needs,
              "baseline_scores": Need.GREEDY_BASELINE in needs}
    assert {f for f in fields if getattr(exp, f) is not None} == {f for f, want in
                                                                  fields.items() if want}
    assert exp.batch_size == 2 * estimator.group_size and info["gold"] is None
    estimator.check(exp)
    advantages, _ = estimator(exp)
    assert advantages.shape == exp.response_ids.shape
