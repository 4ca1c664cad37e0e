"""Direct preference losses on summed response log-probs: DPO (with conservative label
smoothing) and IPO.

Every function takes the log-probability of whole responses, ``log π(y | x) = Σ_t log π(y_t |
s_t)`` over the response tokens (EOS included), of the trained policy and of the frozen
reference, for the chosen ``y_c`` and the rejected ``y_r`` answer of each of ``N`` pairs. The
implicit reward of a response is ``r(x, y) = β·(log π(y | x) − log π_ref(y | x))`` (Rafailov et
al. 2023, Eq. 5) and ``h = (log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r))`` is the
log-ratio margin both losses act on.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

DPO_LOSSES = ("sigmoid", "ipo")


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The mean preference loss over ``N`` pairs, and the standard DPO metrics.

    - ``"sigmoid"`` (DPO, Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7), with
      conservative label smoothing ``ε`` (cDPO: Mitchell 2023, "A note on DPO with noisy
      preferences", Eq. 3; ``ε`` is the assumed probability that a label is flipped)::

          ℓ = −(1 − ε)·log σ(β·h) − ε·log σ(−β·h)

      ``ε = 0`` is plain DPO. This is TRL's ``sigmoid`` loss before TRL 1.0
      (``DPOTrainer.dpo_loss``); TRL 1.16 keeps ``sigmoid`` without ``ε`` (ε = 0 here).
    - ``"ipo"`` (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from
      Human Preferences", Eq. 17; ``β`` is the paper's ``τ``)::

          ℓ = (h̄ − 1 / (2β))²,  h̄ = (log π(y_c) − log π_ref(y_c)) / |y_c|
                                   − (log π(y_r) − log π_ref(y_r)) / |y_r|

      Differs from the paper's sequence-level ``h``: each response's log-ratio is averaged over
      its tokens, as TRL 1.16 does (``trl/trainer/dpo_trainer.py``, ``DPOTrainer._compute_loss``,
      ``loss_type == "ipo"``: "we confirmed this choice with the IPO authors"), so β means the
      same at any response length. Without ``chosen_lengths`` / ``rejected_lengths`` the
      paper's form (``h̄ = h``) is used.

    Args:
        policy_chosen_logps: ``(N,)`` float, ``log π_θ(y_c | x)``.
        policy_rejected_logps: ``(N,)`` float, ``log π_θ(y_r | x)``.
        ref_chosen_logps: ``(N,)`` float, ``log π_ref(y_c | x)`` (detached here).
        ref_rejected_logps: ``(N,)`` float, ``log π_ref(y_r | x)`` (detached here).
        beta: ``β > 0``, the strength of the implicit KL regularisation to the reference.
        loss_type: one of :data:`DPO_LOSSES`.
        label_smoothing: ``ε`` in ``[0, 0.5)``; ``sigmoid`` only.
        chosen_lengths: ``(N,)`` response tokens of ``y_c`` (IPO's per-token average).
        rejected_lengths: ``(N,)`` response tokens of ``y_r``.

    Returns:
        ``(loss, metrics)``: the 0-d mean loss, and detached 0-d means over the pairs, named as
        TRL logs them: ``rewards/chosen`` (``β·(log π − log π_ref)`` of ``y_c``),
        ``rewards/rejected``, ``rewards/margins`` (chosen − rejected), ``rewards/accuracies``
        (fraction with chosen > rejected, a tie counting 0), ``logps/chosen`` and
        ``logps/rejected`` (the policy's summed log-probs).
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"dpo_loss: unknown loss_type {loss_type!r}; valid: {DPO_LOSSES}")
    if beta <= 0:
        raise ValueError(f"dpo_loss: beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo_loss: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"dpo_loss: label_smoothing={label_smoothing} applies to the sigmoid "
                         f"loss only, not {loss_type!r}; set it to 0")
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("dpo_loss: give both chosen_lengths and rejected_lengths, or neither")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps.detach()  # (N,)
    rejected_ratio = policy_rejected_logps - ref_rejected_logps.detach()  # (N,)
    if loss_type == "sigmoid":
        h = chosen_ratio - rejected_ratio
        losses = (-(1.0 - label_smoothing) * F.logsigmoid(beta * h)
                  - label_smoothing * F.logsigmoid(-beta * h))
    else:
        if chosen_lengths is not None:
            chosen_ratio = chosen_ratio / chosen_lengths.clamp(min=1)
            rejected_ratio = rejected_ratio / rejected_lengths.clamp(min=1)
        losses = (chosen_ratio - rejected_ratio - 1.0 / (2.0 * beta)) ** 2
    return losses.mean(), dpo_metrics(policy_chosen_logps, policy_rejected_logps,
                                      ref_chosen_logps, ref_rejected_logps, beta)


def dpo_metrics(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
                beta: float) -> dict[str, Tensor]:
    """The implicit-reward metrics of :func:`dpo_loss` (same arguments, ``(N,)`` each), as
    detached 0-d means; the rewards are ``β·(log π − log π_ref)`` of the summed log-probs
    whatever the loss."""
    chosen = beta * (policy_chosen_logps - ref_chosen_logps).detach()  # (N,)
    rejected = beta * (policy_rejected_logps - ref_rejected_logps).detach()  # (N,)
    return {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
            "rewards/margins": (chosen - rejected).mean(),
            "rewards/accuracies": (chosen > rejected).float().mean(),
            "logps/chosen": policy_chosen_logps.detach().mean(),
            "logps/rejected": policy_rejected_logps.detach().mean()}
