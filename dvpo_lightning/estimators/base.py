"""The contract every advantage estimator keeps.

An estimator is a pure function of an :class:`~dvpo_lightning.rollout.Experience` (no ``self``
state, no distributed calls, no in-place edits) wrapped by a small class that holds its
hyper-parameters, so LightningCLI can pick it by ``class_path``. A subclass implements
:meth:`AdvantageEstimator.estimate`; calling the estimator checks the experience against
what it declared (:meth:`AdvantageEstimator.check`) and runs ``estimate`` without gradient,
once for every estimator. It returns
``(advantages, returns)``, both ``(B, T)`` and zero where ``response_mask`` is False; ``returns``
is only meaningful for estimators with a trained critic. An estimator whose definition ends
with whitening over the global batch (REINFORCE++) leaves that step to the RL module, which
holds the collectives: it returns the advantages before it and sets ``whitens``.

Each estimator *declares* what the experience must carry (:class:`Need`); the RL module fetches
exactly that and nothing else, so no method name is ever tested inside the module.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dvpo_lightning.rollout.experience import NEED_FIELD, Experience, Need


def check_group_sizes(group_ids: Tensor, group_size: int, who: str) -> None:
    """Raise unless every group in the batch has exactly ``group_size`` rows."""
    _, counts = torch.unique(group_ids, return_counts=True)
    if (counts != group_size).any():
        raise ValueError(
            f"{who}: expected every prompt to have group_size={group_size} responses, got group "
            f"sizes {sorted(set(counts.tolist()))}; the data module must repeat each prompt "
            "group_size times"
        )


class AdvantageEstimator:
    """Base class: subclasses set ``needs`` and implement :meth:`estimate`.

    Attributes:
        needs: what the experience must carry for this estimator.
        group_size: responses sampled per prompt (1 unless ``Need.GROUPS``).
        trains_critic: True when ``returns`` are regression targets for a critic.
        whitens: True when the advantages are to be whitened over the valid tokens of every
            process (the module does it, once, also when ``ppo.whiten_advantages`` is set).
    """

    needs: frozenset[Need] = frozenset()
    group_size: int = 1
    trains_critic: bool = False
    whitens: bool = False

    def __call__(self, exp: Experience) -> tuple[Tensor, Tensor]:
        """``(advantages, returns)`` of ``exp``: :meth:`check`, then :meth:`estimate` without
        gradient (advantages are constants of the policy loss)."""
        self.check(exp)
        with torch.no_grad():
            return self.estimate(exp)

    def estimate(self, exp: Experience) -> tuple[Tensor, Tensor]:
        """The estimator's formula: ``(advantages, returns)``, both ``(B, T)``, 0 where
        ``exp.response_mask`` is False."""
        raise NotImplementedError

    def check(self, exp: Experience) -> None:
        """Raise a clear error when ``exp`` lacks a field this estimator declared it needs, or
        (``Need.GROUPS``) a prompt does not have exactly ``group_size`` responses."""
        who = type(self).__name__
        for need in self.needs:
            if getattr(exp, NEED_FIELD[need]) is None:
                raise ValueError(
                    f"{who} needs {need.value!r} but the experience has no "
                    f"{NEED_FIELD[need]!r}; the experience maker must fetch every declared need"
                )
        if Need.GROUPS in self.needs:
            check_group_sizes(exp.group_ids, self.group_size, who)
