"""The contract every advantage estimator keeps.

An estimator is a pure function of an :class:`~dvpo_lightning.rollout.Experience` (no ``self``
state, no distributed calls, no in-place edits) wrapped by a small class that holds its
hyper-parameters, so LightningCLI can pick it by ``class_path``. It returns
``(advantages, returns)``, both ``(B, T)`` and zero where ``response_mask`` is False; ``returns``
is only meaningful for estimators with a trained critic. An estimator whose definition ends
with whitening over the global batch (REINFORCE++) leaves that step to the RL module, which
holds the collectives: it returns the advantages before it and sets ``whitens``.

Each estimator *declares* what the experience must carry (:class:`Need`); the RL module fetches
exactly that and nothing else, so no method name is ever tested inside the module.
"""

from __future__ import annotations

from torch import Tensor

from dvpo_lightning.rollout.experience import NEED_FIELD, Experience, Need


class AdvantageEstimator:
    """Base class: subclasses set ``needs`` and implement ``__call__``.

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
        raise NotImplementedError

    def check(self, exp: Experience) -> None:
        """Raise a clear error when ``exp`` lacks a field this estimator declared it needs."""
        for need in self.needs:
            if getattr(exp, NEED_FIELD[need]) is None:
                raise ValueError(
                    f"{type(self).__name__} needs {need.value!r} but the experience has no "
                    f"{NEED_FIELD[need]!r}; the experience maker must fetch every declared need"
                )
