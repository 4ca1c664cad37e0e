"""The experience batch: everything one rollout produced, in one validated dataclass.

Token alignment (docs/algorithm.md#token-alignment): ``y_1 … y_T`` is stored in ``response_ids``
(right-padded to ``T``); ``logp_*[:, t-1]`` is ``log π(y_t | s_t)``; ``values[:, k]`` is ``u_k``,
with ``u_0`` read at the last prompt token and ``u_t`` at token ``y_t`` (so ``values`` is
``(B, T + 1)``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


class Need(str, enum.Enum):
    """What an advantage estimator needs a rollout to carry beyond log-probs."""

    GVM_VALUES = "gvm_values"  # u_0 … u_T from the frozen Global Value Model
    CRITIC_VALUES = "critic_values"  # u_0 … u_T from a critic trained online (PPO)
    SCORES = "scores"  # sequence reward r(x, y) from the reward model
    GROUPS = "groups"  # n responses per prompt with group ids
    GREEDY_BASELINE = "greedy_baseline"  # RM score of the greedy response to each prompt


NEED_FIELD: dict[Need, str] = {
    Need.GVM_VALUES: "values",
    Need.CRITIC_VALUES: "values",
    Need.SCORES: "scores",
    Need.GROUPS: "group_ids",
    Need.GREEDY_BASELINE: "baseline_scores",
}
"""The :class:`Experience` field each need fills."""


@dataclass
class Experience:
    """One batch of ``B`` sampled responses of at most ``T`` tokens.

    Attributes:
        prompt_ids: ``(B, P) long``, left-padded prompts.
        prompt_mask: ``(B, P) bool``, True on real prompt tokens.
        response_ids: ``(B, T) long``, right-padded responses; ``y_T`` is EOS when finished.
        response_mask: ``(B, T) bool``, True on ``y_1 … y_T`` (EOS included), False after it.
        logp_old: ``(B, T) float``, ``log π_old(y_t | s_t)`` of the policy that sampled, under
            the sampler's temperature, top-k and top-p (docs/sampling.md).
        logp_ref: ``(B, T) float``, ``log π_ref(y_t | s_t)`` of the frozen reference, at the
            sampler's temperature.
        kl_penalty: ``(B, T) float``, the per-token KL penalty ``β·k(logp_old, logp_ref)`` that
            is part of the reward; zeros when the KL is a loss term instead, or when None is
            given (the experience maker leaves it to the RL module's KL penalty).
        values: ``(B, T + 1) float`` or None, ``u_0 … u_T`` from a frozen GVM or a critic.
        scores: ``(B,) float`` or None, sequence reward ``r(x, y)`` from a reward model.
        group_ids: ``(B,) long`` or None, responses with equal id share a prompt.
        baseline_scores: ``(B,) float`` or None, the score of the greedy response to the same
            prompt (ReMax).
        logp_sampler: ``(B, T) float`` or None, ``log π(y_t | s_t)`` as the rollout engine
            computed it while sampling (vLLM); ``logp_old`` minus it is the trainer–sampler gap.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    logp_old: Tensor
    logp_ref: Tensor
    kl_penalty: Tensor | None = None
    values: Tensor | None = None
    scores: Tensor | None = None
    group_ids: Tensor | None = None
    baseline_scores: Tensor | None = None
    logp_sampler: Tensor | None = None

    def __post_init__(self) -> None:
        if self.kl_penalty is None:
            self.kl_penalty = torch.zeros_like(self.logp_old)
        self.validate()

    @property
    def batch_size(self) -> int:
        return self.response_ids.shape[0]

    @property
    def response_length(self) -> int:
        return self.response_ids.shape[1]

    def validate(self) -> None:
        """Check shapes and dtypes once, with messages that name the field."""
        b, t = self.response_ids.shape
        expect = {
            "prompt_mask": (b, self.prompt_ids.shape[1]),
            "response_mask": (b, t),
            "logp_old": (b, t),
            "logp_ref": (b, t),
            "kl_penalty": (b, t),
            "values": (b, t + 1),
            "scores": (b,),
            "group_ids": (b,),
            "baseline_scores": (b,),
            "logp_sampler": (b, t),
        }
        if self.prompt_ids.shape[0] != b:
            raise ValueError(
                f"Experience.prompt_ids has {self.prompt_ids.shape[0]} rows but response_ids has "
                f"{b}; every field must describe the same B responses"
            )
        for name, shape in expect.items():
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(
                    f"Experience.{name} has shape {tuple(value.shape)}, expected {shape} "
                    f"(B={b} responses, T={t} response tokens)"
                )
        for name in ("prompt_mask", "response_mask"):
            if getattr(self, name).dtype != torch.bool:
                raise ValueError(f"Experience.{name} must be bool, got {getattr(self, name).dtype}")

    def to(self, device: torch.device | str) -> Experience:
        moved = {
            f.name: (v.to(device) if isinstance(v, Tensor) else v)
            for f in fields(self)
            for v in [getattr(self, f.name)]
        }
        return Experience(**moved)

    def index(self, idx: Tensor | slice) -> Experience:
        """Rows ``idx`` of every field (a mini-batch)."""
        return replace(
            self,
            **{
                f.name: getattr(self, f.name)[idx]
                for f in fields(self)
                if getattr(self, f.name) is not None
            },
        )
