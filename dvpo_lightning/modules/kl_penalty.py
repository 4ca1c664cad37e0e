"""The KL to the reference policy, handled in one place: its estimator, where β acts (the
reward or the loss), how β moves (fixed or adaptive) and the bound that stops a drifting run."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from dvpo_lightning.ops.kl import AdaptiveKLController, FixedKLController, kl_estimate
from dvpo_lightning.ops.losses import aggregate
from dvpo_lightning.rollout.experience import Experience
from dvpo_lightning.runtime.guards import KLBoundError


@dataclass(frozen=True)
class KLSettings:
    """The KL to the reference policy.

    Args:
        coef: the coefficient β (its start when ``adaptive``); the paper uses 0.05 and
            ablates {0.01, 0.05, 0.1} (App. H).
        estimator: per-token estimator of KL(π‖π_ref) from sampled tokens: ``k1`` (the
            log-ratio, the authors' code), ``k2`` or ``k3`` (Schulman 2020).
        where: ``reward``: −β·KL_t is part of every token's reward (PPO style); ``loss``: β·KL
            is added to the policy loss instead (GRPO style).
        adaptive: steer β towards ``target`` (Ziegler et al. 2019) instead of keeping it fixed.
        target: the adaptive controller's target KL per response.
        horizon: the adaptive controller's horizon, in responses.
        bound: stop (or warn, see ``on_exceeded``) when a rollout's mean KL per response
            exceeds this; None: no bound.
        on_exceeded: past ``bound``: ``stop`` the run or ``warn`` and go on (logged either way
            as ``guard/kl_exceeded``).
    """

    coef: float = 0.05
    estimator: Literal["k1", "k2", "k3"] = "k1"
    where: Literal["reward", "loss"] = "reward"
    adaptive: bool = False
    target: float = 6.0
    horizon: int = 10000
    bound: float | None = None
    on_exceeded: Literal["stop", "warn"] = "stop"

    def __post_init__(self) -> None:
        if self.coef < 0 or self.target <= 0 or self.horizon <= 0:
            raise ValueError("model.init_args.kl: need coef >= 0, target > 0 and horizon > 0, got "
                             f"coef={self.coef}, target={self.target}, horizon={self.horizon}. Fix "
                             "the model.init_args.kl.* keys named")


torch.serialization.add_safe_globals([KLSettings])  # in checkpointed hparams


class KLPenalty:
    """Every use of the KL to the reference in an RL step.

    Args:
        settings: the run's :class:`KLSettings`.
    """

    def __init__(self, settings: KLSettings) -> None:
        self.settings = settings
        self.controller = (AdaptiveKLController(settings.coef, settings.target, settings.horizon)
                           if settings.adaptive else FixedKLController(settings.coef))

    @property
    def coef(self) -> float:
        """β now."""
        return self.controller.coef

    def per_token(self, logp: Tensor, logp_ref: Tensor, mask: Tensor) -> Tensor:
        """``(B, T)`` KL estimate per token, 0 where ``mask`` is False."""
        return kl_estimate(logp, logp_ref, self.settings.estimator, mask)

    def in_reward(self, exp: Experience) -> tuple[Experience, Tensor]:
        """``exp`` with its per-token ``kl_penalty`` set (β·KL_t when β acts on the reward,
        zeros when it acts on the loss), and the per-token KL ``(B, T)`` of its responses."""
        kl = self.per_token(exp.logp_old, exp.logp_ref, exp.response_mask)
        penalty = kl * self.coef if self.settings.where == "reward" else torch.zeros_like(kl)
        return replace(exp, kl_penalty=penalty), kl

    def loss(self, logp: Tensor, logp_ref: Tensor, mask: Tensor, aggregation: str,
             n_tokens: float, n_seqs: float) -> Tensor | None:
        """The KL loss term (before β) of a mini-batch when β acts on the loss, else None."""
        if self.settings.where != "loss":
            return None
        return aggregate(self.per_token(logp, logp_ref, mask), mask, aggregation, n_tokens,
                         n_seqs)

    def check_bound(self, kl_per_response: float, rl_step: int) -> bool:
        """Compare a rollout's mean KL per response with the bound: False within it; past it,
        raise :class:`KLBoundError` (``on_exceeded=stop``) or warn and return True."""
        bound = self.settings.bound
        if bound is None or kl_per_response <= bound:
            return False
        msg = (f"the rollout's KL to the reference, {kl_per_response:.4f} nats per response at RL "
               f"step {rl_step}, exceeds model.init_args.kl.bound={bound}: the policy is drifting "
               "from the reference. Raise model.init_args.kl.coef, lower "
               "model.init_args.optim.lr, or raise model.init_args.kl.bound")
        if self.settings.on_exceeded == "stop":
            raise KLBoundError(msg + "; the last checkpoint is the last good one.")
        rank_zero_warn(msg + " (model.init_args.kl.on_exceeded=warn: going on).")
        return True

    def update(self, kl_per_response: float, n_responses: int) -> None:
        """Move β (adaptive) after a rollout of ``n_responses`` with this mean KL."""
        self.controller.update(kl_per_response, n_responses)

    def state_dict(self) -> dict[str, float]:
        return self.controller.state_dict()

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.controller.load_state_dict(state)
