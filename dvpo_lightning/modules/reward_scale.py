"""One scale for every method's reward: the frozen scorer's output standardised on the
starting policy's samples, so that one KL coefficient β is the same pressure for each method.

The GVM's values sit on the annotators' scale (0–1 on the embedded task, ±1 for a GVM fit to
pairs); a Bradley–Terry reward model's scores have no scale at all (any constant added cancels
in its loss, and its spread is whatever the fit gave). With ``−β·KL`` in the reward, β then
trades a KL nat against a different amount of reward for each method. ``normalize:
first_rollout`` fixes the unit: the scorer's *sequence* score (the reward model's ``r(x, y)``,
or the GVM's value of the finished response ``u_L``) is standardised by its mean and standard
deviation over the first rollout — the starting policy's own samples (the reference's, as RL
starts from it), over every process — and that affine map, frozen from then on (and
checkpointed), is applied to every score the run's estimator reads: the reward model's scores
and the greedy baseline's (ReMax), or every GVM value ``u_0 … u_T``. A reward one standard
deviation of the starting policy's spread above its mean reads 1.0 for every method.

Estimators that whiten their advantages per batch or per group (GRPO, REINFORCE++, RLOO) are
invariant to the scale of the reward itself; the KL term in their reward is not, which is what
this fixes. Why the first rollout and not the training data: the data's spread depends on the
behaviour policies that wrote it, not on the policy being trained (docs/study.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from dvpo_lightning.rollout.experience import Experience, Need
from dvpo_lightning.rollout.scoring import final_scores
from dvpo_lightning.runtime.distributed import all_reduce_sum

REWARD_NORMS = ("none", "first_rollout")


@dataclass(frozen=True)
class RewardSettings:
    """How the frozen scorer's output reaches the estimator.

    Args:
        normalize: ``none`` (raw scores and values) or ``first_rollout`` (standardised by the
            mean and standard deviation of the sequence score on the first rollout, the
            starting policy's samples; frozen after; see the module docstring).
        min_std: the smallest standard deviation divided by (a scorer that gives the starting
            policy's samples one value would otherwise blow up).
    """

    normalize: Literal["none", "first_rollout"] = "none"
    min_std: float = 1e-6

    def __post_init__(self) -> None:
        if self.normalize not in REWARD_NORMS:
            raise ValueError(f"model.init_args.reward.normalize={self.normalize!r} is not one of "
                             f"{REWARD_NORMS}. Fix: model.init_args.reward.normalize=none (raw) or "
                             "first_rollout (one scale for every method)")
        if not self.min_std > 0:
            raise ValueError(f"model.init_args.reward.min_std={self.min_std} must be > 0. Fix: "
                             "model.init_args.reward.min_std=1e-6")


torch.serialization.add_safe_globals([RewardSettings])  # in checkpointed hparams


def sequence_reward(exp: Experience, needs: frozenset[Need]) -> Tensor | None:
    """``(B,)`` the scorer's score of each finished response: the reward model's ``r(x, y)``,
    else the frozen GVM's ``u_L``; None when the run has neither (a critic's values are not a
    reward)."""
    if exp.scores is not None:
        return exp.scores
    if Need.GVM_VALUES in needs and exp.values is not None:
        return final_scores(exp.values, exp.response_mask)
    return None


def standardise_moments(x: Tensor) -> tuple[float, float]:
    """Mean and (unbiased) standard deviation of ``x (B,)`` over every process's rows, from
    all-reduced float64 sums: the same on every rank, whatever the number of ranks."""
    sums = all_reduce_sum(torch.stack([
        x.detach().double().sum(), (x.detach().double() ** 2).sum(),
        torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)]))
    total, total_sq, n = sums.tolist()
    mean = total / n
    var = (total_sq - n * mean * mean) / max(n - 1.0, 1.0)
    return mean, math.sqrt(max(var, 0.0))


class RewardScale:
    """The affine map ``s ↦ (s − mean) / std`` of :class:`RewardSettings`, fitted on the first
    experience it sees and applied to every experience after (see the module docstring)."""

    def __init__(self, settings: RewardSettings = RewardSettings()) -> None:
        self.settings = settings
        self.mean: float | None = None
        self.std: float | None = None

    @property
    def active(self) -> bool:
        return self.settings.normalize != "none"

    def __call__(self, exp: Experience, needs: frozenset[Need]) -> Experience:
        """``exp`` with its reward-model scores, greedy-baseline scores and GVM values mapped
        (unchanged with ``normalize: none`` or without a scorer)."""
        if not self.active:
            return exp
        reward = sequence_reward(exp, needs)
        if reward is None:
            return exp
        if self.mean is None:  # the first rollout: the starting policy's samples
            self.mean, std = standardise_moments(reward)
            self.std = max(std, self.settings.min_std)
        m, s = self.mean, self.std

        def scaled(x: Tensor | None) -> Tensor | None:
            return None if x is None else (x - m) / s

        out = {"scores": scaled(exp.scores), "baseline_scores": scaled(exp.baseline_scores)}
        if Need.GVM_VALUES in needs:
            out["values"] = scaled(exp.values)
        return replace(exp, **out)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.std = state.get("mean"), state.get("std")
