"""Return recursions: λ-returns, GAE and the GVM's regression targets.

Token alignment (``docs/algorithm.md#token-alignment``): a response ``y_1 … y_T`` is
right-padded; ``values`` is ``(B, T + 1)`` = ``u_0 … u_T`` with ``u_{t-1} = V(s_t)`` and
``u_t = Q(s_t, a_t)``. Every recursion treats the step after the last valid position as
terminal (value 0): nothing is bootstrapped from padding, and masked inputs never reach an
output.
"""

from __future__ import annotations

import torch
from torch import Tensor

GVM_TARGET_MODES = ("td0", "td_lambda", "mc")
GVM_TARGET_POSITIONS = ("all", "before_token")


def _check_right_padded(mask: Tensor, fn: str) -> None:
    if mask.dtype != torch.bool:
        raise ValueError(f"{fn}: mask must be bool, got {mask.dtype}; pass `mask.bool()`")
    if mask.shape[-1] > 1 and (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError(
            f"{fn}: mask must be a contiguous prefix of True per row (right padding), but some "
            "row has a True after a False; left-padded or holed masks are not supported"
        )


def _zero(x: Tensor) -> Tensor:
    return torch.zeros((), dtype=x.dtype, device=x.device)


def lambda_returns(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 1.0
) -> Tensor:
    """λ-returns over the valid prefix of each row.

    ``G_k = r_k + γ·[(1 − λ)·v_{k+1} + λ·G_{k+1}]``, with ``v`` and ``G`` after the last valid
    position equal to 0 (terminal). λ = 0 is TD(0) ``r_k + γ·v_{k+1}``; λ = 1 is the Monte-Carlo
    discounted return-to-go ``Σ_{j≥k} γ^{j−k} r_j`` (Sutton & Barto §12.1).

    Args:
        rewards: ``(B, N)`` float, ``r_k``.
        values: ``(B, N)`` float, ``v_k`` (the bootstrap value of position ``k``).
        mask: ``(B, N)`` bool, a contiguous prefix of valid positions per row.
        gamma: discount γ.
        lam: λ ∈ [0, 1].

    Returns:
        ``(B, N)`` float, ``G_k``; 0 at masked positions.
    """
    _check_right_padded(mask, "lambda_returns")
    r = torch.where(mask, rewards, _zero(rewards))
    v = torch.where(mask, values, _zero(values))
    next_v = torch.zeros_like(r[:, 0])
    next_g = torch.zeros_like(r[:, 0])
    out = []
    for k in reversed(range(r.shape[1])):
        g = r[:, k] + gamma * ((1.0 - lam) * next_v + lam * next_g)
        g = torch.where(mask[:, k], g, _zero(g))
        out.append(g)
        next_v, next_g = v[:, k], g
    return torch.stack(out[::-1], dim=1)


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, Eq. 16).

    ``δ_t = r_t + γ·V(s_{t+1}) − V(s_t)``, ``A_t = δ_t + γλ·A_{t+1}``, ``returns_t = A_t + V(s_t)``
    with ``V(s_t) = values[:, t−1]`` (``u_{t−1}``) and ``V(s_{L+1}) = 0`` after the last valid
    token ``L`` of the row: the episode ended, so ``u_L`` (the value of the finished response)
    is never used as a bootstrap. NeMo-Aligner: γ = 0.5, λ = 0, ``V = [0, 1, 2, 3]``,
    ``r = [0, 0, 1, 0]`` → ``A = [0.5, 0, 0.5, −3]``.

    Args:
        rewards: ``(B, T)`` float, token rewards ``r_t``.
        values: ``(B, T + 1)`` float, ``u_0 … u_T``.
        mask: ``(B, T)`` bool, the response mask (right padded).
        gamma: discount γ.
        lam: GAE λ.

    Returns:
        ``(advantages, returns)``, both ``(B, T)`` float, 0 at masked positions.
    """
    _check_right_padded(mask, "gae")
    b, t = rewards.shape
    if values.shape != (b, t + 1):
        raise ValueError(
            f"gae: values has shape {tuple(values.shape)}, expected {(b, t + 1)} = u_0 … u_T "
            f"for rewards of shape {(b, t)}"
        )
    r = torch.where(mask, rewards, _zero(rewards))
    v = torch.where(mask, values[:, :t], _zero(values))  # V(s_t) = u_{t-1}, t = 1 … T
    next_v = torch.zeros_like(r[:, 0])  # V(s_{t+1}); 0 after the last valid token
    next_adv = torch.zeros_like(r[:, 0])
    adv = []
    for k in reversed(range(t)):
        delta = r[:, k] + gamma * next_v - v[:, k]
        a = torch.where(mask[:, k], delta + gamma * lam * next_adv, _zero(delta))
        adv.append(a)
        next_v, next_adv = v[:, k], a
    advantages = torch.stack(adv[::-1], dim=1)
    returns = torch.where(mask, advantages + v, _zero(v))
    return advantages, returns


def token_rewards(scores: Tensor | None, kl_penalty: Tensor, mask: Tensor) -> Tensor:
    """Per-token rewards ``r_t = −kl_penalty_t + [t = L]·score`` (PPO's shaped reward).

    Args:
        scores: ``(B,)`` float sequence reward ``r(x, y)``, or None for KL-only rewards.
        kl_penalty: ``(B, T)`` float, ``β·KL_t``.
        mask: ``(B, T)`` bool, right padded.

    Returns:
        ``(B, T)`` float, 0 at masked positions.
    """
    _check_right_padded(mask, "token_rewards")
    r = torch.where(mask, -kl_penalty, _zero(kl_penalty))
    if scores is None:
        return r
    last = mask.sum(1, keepdim=True) - 1  # (B, 1); −1 on an empty row matches no position
    at_last = torch.arange(mask.shape[1], device=mask.device)[None, :] == last
    return r + torch.where(at_last, scores[:, None].to(r.dtype), _zero(r))


def sequence_rewards(scores: Tensor, kl_penalty: Tensor, mask: Tensor) -> Tensor:
    """Sequence reward ``R_i = score_i − Σ_t kl_penalty_{i,t}`` (the γ = 1 return of the shaped
    rewards), used by GRPO, RLOO and ReMax.

    Args:
        scores: ``(B,)`` float.
        kl_penalty: ``(B, T)`` float.
        mask: ``(B, T)`` bool.

    Returns:
        ``(B,)`` float.
    """
    return scores - torch.where(mask, kl_penalty, _zero(kl_penalty)).sum(1)


def gvm_value_targets(
    values: Tensor,
    response_mask: Tensor,
    scores: Tensor,
    mode: str,
    gamma: float = 1.0,
    lam: float = 0.95,
    positions: str = "all",
) -> tuple[Tensor, Tensor]:
    """Regression targets for the Global Value Model (stage 1), bootstrapped under stop-gradient.

    The token rewards are 0 except ``r`` (``scores``) at the last trained position; the value
    after it is 0. Targets are :func:`lambda_returns` of the *detached* ``values`` with

    - ``mode="td0"``: λ = 0, ``target_k = r_k + γ·u_{k+1}`` (paper Eq. 1);
    - ``mode="td_lambda"``: λ = ``lam`` (authors' code: γ = 1, λ = 0.95);
    - ``mode="mc"``: λ = 1, every trained position regresses on ``γ^{L'−k}·r``.

    Positions (``L`` = valid response length of the row):

    - ``"all"`` (paper's Q view): ``u_0 … u_L`` are trained; ``u_L`` (the finished response) has
      target ``r`` and ``u_k``'s TD(0) target is ``γ·u_{k+1}``. ``L + 1`` positions.
    - ``"before_token"`` (authors' code): ``u_0 … u_{L−1}`` (the states ``s_1 … s_L`` before each
      response token) are trained, ``r`` sits on ``u_{L−1}``; ``L`` positions. ``u_L`` is never
      trained. Differs from the paper: the value of the finished response is not learnt.

    Args:
        values: ``(B, T + 1)`` float, ``u_0 … u_T`` of the model being trained.
        response_mask: ``(B, T)`` bool, right padded.
        scores: ``(B,)`` float, the return ``r`` of each response.
        mode: ``"td0"``, ``"td_lambda"`` or ``"mc"``.
        gamma: discount γ (paper and code: 1).
        lam: λ for ``mode="td_lambda"`` (ignored otherwise).
        positions: ``"all"`` or ``"before_token"``.

    Returns:
        ``(targets, train_mask)``: ``(B, T + 1)`` float targets (0 where untrained) and
        ``(B, T + 1)`` bool, True on the trained positions.
    """
    if mode not in GVM_TARGET_MODES:
        raise ValueError(f"gvm_value_targets: unknown mode {mode!r}; valid: {GVM_TARGET_MODES}")
    if positions not in GVM_TARGET_POSITIONS:
        raise ValueError(
            f"gvm_value_targets: unknown positions {positions!r}; valid: {GVM_TARGET_POSITIONS}"
        )
    _check_right_padded(response_mask, "gvm_value_targets")
    b, t = response_mask.shape
    if values.shape != (b, t + 1) or scores.shape != (b,):
        raise ValueError(
            f"gvm_value_targets: values {tuple(values.shape)} and scores {tuple(scores.shape)} "
            f"must be {(b, t + 1)} and {(b,)} for a response mask of shape {(b, t)}"
        )
    length = response_mask.sum(1, keepdim=True)  # (B, 1), L per row
    k = torch.arange(t + 1, device=values.device)[None, :]  # (1, T + 1)
    last = length if positions == "all" else length - 1  # trained positions are 0 … last
    train_mask = k <= last
    rewards = torch.where(k == last, scores[:, None].to(values.dtype), _zero(values))
    lam_mode = {"td0": 0.0, "td_lambda": lam, "mc": 1.0}[mode]
    targets = lambda_returns(rewards, values.detach(), train_mask, gamma, lam_mode)
    return targets, train_mask
