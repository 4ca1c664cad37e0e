"""Numerical guards of the RL update: find non-finite tensors and say what likely caused them.

The module checks the rollout (rewards, values, log-probs), the advantages, every mini-batch
loss and the gradient norm; on a hit it stops the run (the default) or skips the step, with a
message naming the RL step, the tensor and the likely cause. Stopping raises before anything
is saved, so the last checkpoint on disk stays the last good one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from dvpo_lightning.runtime.distributed import all_reduce_sum

CAUSES = {
    "scores": "the reward model's scores: check its weights and its precision (fp16 "
              "overflow), or that its tokenizer matches the policy's",
    "baseline_scores": "the reward model's scores of the greedy baseline (see scores)",
    "values": "the value model's outputs (GVM or critic): check its weights and precision; a "
              "critic can diverge with a high learning rate (lower "
              "model.init_args.optim.critic_lr)",
    "logits": "the policy's logits are NaN / inf, so no token can be sampled: lower the "
              "learning rate, train in bf16 or fp32 instead of fp16, or check the starting "
              "checkpoint",
    "logp_old": "the policy's logits overflowed: lower the learning rate, train in bf16 or "
                "fp32 instead of fp16, or check the starting checkpoint",
    "logp_ref": "the reference policy's logits overflowed: check the reference checkpoint "
                "and its precision",
    "kl": "the KL estimate: the policy and reference log-probs diverged (see logp_old)",
    "advantages": "non-finite rewards or values upstream, or whitening a batch whose "
                  "advantages are all equal",
    "returns": "non-finite rewards or values upstream",
    "loss": "the probability ratio exp(log π − log π_old) overflowed or the policy's logits "
            "are non-finite: lower the learning rate or clip_eps, or set max_grad_norm",
    "grad_norm": "exploding gradients: lower the learning rate, set "
                 "model.init_args.ppo.max_grad_norm, or train in bf16/fp32 instead of fp16",
}


class NonFiniteError(FloatingPointError):
    """A guarded tensor held NaN or ±inf (the message names it, the step and the cause)."""


class SamplerMismatchError(RuntimeError):
    """The rollout engine's log-probs of its samples are too far from the trainer's."""


class KLBoundError(RuntimeError):
    """The policy's KL to the reference exceeded ``model.kl.bound``."""


def nonfinite_names(tensors: dict[str, Tensor | None],
                    masks: dict[str, Tensor] | None = None) -> list[str]:
    """Names of the tensors with a NaN or ±inf where their mask (if any) is True.

    Args:
        tensors: ``{name: tensor or None}``; None entries are skipped.
        masks: ``{name: bool tensor of the same shape}``: positions outside are padding and
            are not checked.
    """
    bad = []
    for name, t in tensors.items():
        if t is None:
            continue
        finite = torch.isfinite(t)
        if masks and name in masks:
            finite = finite | ~masks[name].bool()
        if not bool(finite.all()):
            bad.append(name)
    return bad


def nonfinite_message(names: list[str], where: str, rl_step: int, action: str) -> str:
    """The guard's message: what, where, when, the likely cause of each, and what happens."""
    lines = [f"non-finite values (NaN or inf) in {', '.join(names)} during {where} at RL step "
             f"{rl_step}; {action}."]
    lines += [f"  {n}: likely {CAUSES.get(n, 'an upstream non-finite value')}" for n in names]
    lines.append("  Set model.init_args.guards.on_nonfinite=skip to skip such steps instead of "
                 "stopping (each skip is logged as guard/skipped_steps).")
    return "\n".join(lines)


@dataclass(frozen=True)
class GuardSettings:
    """Numerical guards of an RL step.

    Args:
        on_nonfinite: a NaN / inf in the rollout, the advantages, a mini-batch loss or the
            gradient: ``stop`` the run (nothing is saved after it, so the last checkpoint is
            the last good one) or ``skip`` the step (counted in ``guard/skipped_steps``).
        ratio_skip_threshold: skip a mini-batch whose mean ratio π/π_old exceeds this (a
            policy that moved too far for the clip to mean anything).
    """

    on_nonfinite: Literal["stop", "skip"] = "stop"
    ratio_skip_threshold: float = 10.0


torch.serialization.add_safe_globals([GuardSettings])  # in checkpointed hparams


class StepGuard:
    """Checks tensors for NaN / inf and applies ``on_nonfinite``; counts the skipped steps.

    Args:
        settings: the run's :class:`GuardSettings`.
    """

    def __init__(self, settings: GuardSettings) -> None:
        self.settings = settings
        self.skips = 0

    def check(self, where: str, rl_step: int, tensors: dict[str, Tensor | None],
              masks: dict[str, Tensor] | None = None,
              reduce_on: torch.device | None = None) -> bool:
        """True when a tensor is non-finite and the step is to be skipped; raises
        :class:`NonFiniteError` when the run is to stop.

        Args:
            where: the phase, for the message ("the rollout", "the PPO update", ...).
            rl_step: the RL step, for the message.
            tensors: ``{name: tensor or None}`` (see :func:`nonfinite_names`).
            masks: ``{name: bool mask}``: positions outside are padding, not checked.
            reduce_on: decide over every process (one all-reduce on this device), so that all
                ranks skip together; None decides on this process alone.
        """
        names = nonfinite_names(tensors, masks)
        bad = bool(names)
        if reduce_on is not None:
            bad = float(all_reduce_sum(torch.tensor(float(bad), device=reduce_on))) > 0
        return bad and self.on_nonfinite(names, where, rl_step)

    def on_nonfinite(self, names: list[str], where: str, rl_step: int) -> bool:
        """Stop (raise) or warn and count a skip, returning True."""
        names = names or ["a tensor on another process"]
        if self.settings.on_nonfinite == "stop":
            raise NonFiniteError(nonfinite_message(
                names, where, rl_step,
                "stopping before anything is saved: the last checkpoint is the last good one"))
        rank_zero_warn(nonfinite_message(names, where, rl_step, "skipping it"))
        self.skips += 1
        return True

    def state_dict(self) -> dict[str, int]:
        return {"skips": self.skips}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skips = int(state.get("skips", 0))
