"""DVPO: advantages from a frozen Global Value Model, in three versions
(docs/algorithm.md#the-three-advantage-versions).

With ``u_0 … u_T`` the GVM's outputs (``u_{t−1} = V(s_t)``, ``u_t = Q(s_t, a_t)``):

- ``"paper"`` (§3.3): ``Â_t = u_t − Σ_{k≥t} γ^{k−t}·kl_penalty_k``, the raw Q of the prefix
  through ``y_t`` plus the KL part of the return-to-go (exactly ``u_t`` when the KL penalty is
  zero, e.g. KL as a loss term);
- ``"value_difference"``: ``Â_t = u_t − u_{t−1} − kl_penalty_t = Q(s_t, a_t) − V(s_t) − KL_t``
  (App. B's ``A = Q − b(s)``); over a response it sums to ``u_L − u_0 − Σ_t kl_penalty_t``;
- ``"code"`` (authors' code, a faithful-reproduction mode, not a recommendation): per-sequence
  whitened values, KL-only rewards, GAE(γ, λ), then batch whitening of the advantages.

No critic is trained: ``returns`` are zeros.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dvpo_lightning.estimators.base import AdvantageEstimator, Need
from dvpo_lightning.ops.masked import masked_sum, masked_whiten
from dvpo_lightning.ops.returns import gae, lambda_returns, token_rewards
from dvpo_lightning.rollout.experience import Experience

GVM_VERSIONS = ("paper", "value_difference", "code")


def _whiten_rows(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """Whiten each row over its own valid positions (unbiased variance), 0 where masked.

    A row with one valid position has variance 0 by convention (``n − 1`` clamped to 1) and
    whitens to 0; an empty row stays 0.
    """
    n = mask.sum(-1, keepdim=True).to(x.dtype)  # (B, 1)
    mean = masked_sum(x, mask, dim=-1)[:, None] / n.clamp(min=1)
    var = masked_sum((x - mean) ** 2, mask, dim=-1)[:, None] / (n - 1).clamp(min=1)
    return torch.where(mask, (x - mean) * torch.rsqrt(var + eps), 0.0)


def gvm_advantages(
    values: Tensor,
    kl_penalty: Tensor,
    mask: Tensor,
    version: str = "value_difference",
    gamma: float = 1.0,
    lam: float = 0.95,
) -> Tensor:
    """DVPO advantages from frozen GVM values (see the module docstring for the versions).

    ``"code"`` in detail: the values GAE reads as ``V(s_t) = u_{t−1}`` for ``t = 1 … L`` (i.e.
    ``u_0 … u_{L−1}``, selected by the response mask; ``u_L`` is never read because the value
    after the last token is 0) are whitened per sequence; rewards are ``−kl_penalty_t`` only
    (the sequence score is *not* added: the GVM replaces the reward model); then
    ``A = GAE(γ, λ)`` with value 0 after the last token; then ``A`` is whitened over the valid
    tokens of this batch. That final batch whitening is part of the authors' recipe, so it lives
    here rather than in :mod:`.normalize`; do not also enable the module's whitening flag.

    Args:
        values: ``(B, T + 1)`` float, ``u_0 … u_T`` from the frozen GVM.
        kl_penalty: ``(B, T)`` float, ``β·KL_t`` (zeros when the KL is a loss term).
        mask: ``(B, T)`` bool, response mask (right padded).
        version: ``"paper"``, ``"value_difference"`` or ``"code"``.
        gamma: discount γ (``"paper"``: discounts the KL return-to-go; ``"code"``: GAE's γ;
            unused by ``"value_difference"``, where ``u_t`` already is ``Q(s_t, a_t)``).
        lam: GAE λ, ``"code"`` only.

    Returns:
        ``(B, T)`` float advantages, 0 where masked.
    """
    if version not in GVM_VERSIONS:
        raise ValueError(f"gvm_advantages: unknown version {version!r}; valid: {GVM_VERSIONS}")
    b, t = mask.shape
    if values.shape != (b, t + 1):
        raise ValueError(
            f"gvm_advantages: values has shape {tuple(values.shape)}, expected {(b, t + 1)} "
            f"= u_0 … u_T for a response mask of shape {(b, t)}"
        )
    values = values.detach()
    kl = torch.where(mask, kl_penalty, 0.0)
    if version == "paper":
        kl_to_go = lambda_returns(kl, torch.zeros_like(kl), mask, gamma, 1.0)
        adv = values[:, 1:] - kl_to_go
    elif version == "value_difference":
        adv = values[:, 1:] - values[:, :-1] - kl
    else:
        v = _whiten_rows(values[:, :t], mask)  # V(s_t) = u_{t-1}, t = 1 … L
        v = torch.cat([v, torch.zeros_like(v[:, :1])], dim=1)  # (B, T + 1); u_T unused
        adv, _ = gae(token_rewards(None, kl_penalty, mask), v, mask, gamma, lam)
        adv = masked_whiten(adv, mask)
    return torch.where(mask, adv, 0.0)


class GVM(AdvantageEstimator):
    """DVPO's estimator: a frozen Global Value Model in place of reward model and critic.

    Args:
        version: "paper" (u_t), "value_difference" (u_t − u_{t−1}) or "code" (authors' code).
        gamma: discount γ (paper and code: 1).
        lam: GAE λ for version "code" (authors' code: 0.95).
    """

    needs = frozenset({Need.GVM_VALUES})

    def __init__(
        self, version: str = "value_difference", gamma: float = 1.0, lam: float = 0.95
    ) -> None:
        if version not in GVM_VERSIONS:
            raise ValueError(f"GVM: unknown version {version!r}; valid: {GVM_VERSIONS}")
        self.version = version
        self.gamma = gamma
        self.lam = lam

    def estimate(self, exp: Experience) -> tuple[Tensor, Tensor]:
        adv = gvm_advantages(
            exp.values, exp.kl_penalty, exp.response_mask, self.version, self.gamma, self.lam
        )
        return adv, torch.zeros_like(adv)
