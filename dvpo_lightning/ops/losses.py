"""Losses: Bradley–Terry, value regression, clipped value loss, PPO-clip, aggregation, entropy.

Per-token losses are reduced by :func:`aggregate`, which can divide by a *global* token or
sequence count so that a batch split across ranks or gradient-accumulation steps sums to
exactly the full-batch loss (OpenRLHF ``tests/test_loss_aggregation.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dvpo_lightning.ops.masked import masked_mean, masked_sum

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")


def aggregate(
    loss_tokens: Tensor,
    mask: Tensor,
    mode: str = "token_mean",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
) -> Tensor:
    """Reduce a per-token loss to a scalar.

    - ``"token_mean"``: ``Σ_{i,t} m·ℓ / N_tok`` (every valid token weighs the same);
    - ``"seq_mean_token_mean"``: ``Σ_i (Σ_t m·ℓ / Σ_t m) / N_seq`` (every sequence weighs the same;
      needs at least one valid token per row);
    - ``"seq_mean_token_sum"``: ``Σ_i Σ_t m·ℓ / N_seq`` (Dr. GRPO-style, no length normalisation).

    Args:
        loss_tokens: ``(B, T)`` float.
        mask: ``(B, T)`` bool.
        mode: one of :data:`AGGREGATIONS`.
        num_tokens: ``N_tok``, the valid-token count of the *whole* batch (all ranks and
            accumulation steps); defaults to ``mask.sum()``. Used by ``"token_mean"`` only.
        num_seqs: ``N_seq``, the sequence count of the whole batch; defaults to ``B``. Used by
            the ``"seq_*"`` modes only.

    Returns:
        0-d float.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"aggregate: unknown mode {mode!r}; valid: {AGGREGATIONS}")
    for name, count in (("num_tokens", num_tokens), ("num_seqs", num_seqs)):
        if count is not None and count <= 0:
            raise ValueError(f"aggregate: {name} must be > 0, got {count}; pass the global count")
    if mode == "token_mean":
        if num_tokens is None:
            return masked_mean(loss_tokens, mask)
        return masked_sum(loss_tokens, mask) / num_tokens
    if mode == "seq_mean_token_mean":
        per_seq = masked_mean(loss_tokens, mask, dim=-1)  # (B,)
    else:
        per_seq = masked_sum(loss_tokens, mask, dim=-1)  # (B,)
    return per_seq.sum() / (per_seq.shape[0] if num_seqs is None else num_seqs)


def bradley_terry_loss(
    chosen_scores: Tensor, rejected_scores: Tensor, margin: Tensor | None = None
) -> Tensor:
    """Reward-model loss ``mean(−log σ(s_c − s_r − m))`` (Ouyang et al. 2022, Eq. 1; Llama-2's
    margin ``m``).

    Args:
        chosen_scores: ``(B,)`` float, ``s_c``.
        rejected_scores: ``(B,)`` float, ``s_r``.
        margin: ``(B,)`` float or None (0).

    Returns:
        0-d float.
    """
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def score_regression_loss(scores: Tensor, targets: Tensor) -> Tensor:
    """Reward model regressed on annotated scores: ``mean ½·(r − s)²`` over responses (the
    GVM's :func:`value_regression_loss` at the final token only; docs/study.md, the
    information 2 × 2).

    Args:
        scores: ``(B,)`` float, ``r(x, y)`` at the last response token.
        targets: ``(B,)`` float, the annotated scores ``s``.

    Returns:
        0-d float.
    """
    return (0.5 * (scores - targets.to(scores.dtype)) ** 2).mean()


def value_regression_loss(
    pred: Tensor, target: Tensor, mask: Tensor, num_tokens: float | None = None
) -> Tensor:
    """GVM loss: token mean of ``½·(pred − sg[target])²`` over ``mask`` (paper Eq. 1).

    Args:
        pred: ``(B, N)`` float, ``u_k``.
        target: ``(B, N)`` float, detached here (stop-gradient on the bootstrap).
        mask: ``(B, N)`` bool, the trained positions.
        num_tokens: global count of trained positions (see :func:`aggregate`).

    Returns:
        0-d float.
    """
    sq = 0.5 * (pred - target.detach()) ** 2
    return aggregate(sq, mask, "token_mean", num_tokens=num_tokens)


def clipped_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range: float | None = 0.2,
    aggregation: str = "token_mean",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
) -> Tensor:
    """PPO critic loss ``½·max((V − R)², (V_old + clip(V − V_old, −c, c) − R)²)``
    (Schulman et al. 2017; OpenAI baselines ``ppo2``).

    Args:
        values: ``(B, T)`` float, the critic's current ``V(s_t) = u_{t−1}``
            (i.e. ``u[:, :T]``, aligned with ``returns``).
        old_values: ``(B, T)`` float, the values at rollout time.
        returns: ``(B, T)`` float, GAE returns (detached here).
        mask: ``(B, T)`` bool.
        clip_range: ``c``; None disables clipping (plain ½ squared error).
        aggregation: see :func:`aggregate`.
        num_tokens: see :func:`aggregate`.
        num_seqs: see :func:`aggregate`.

    Returns:
        0-d float.
    """
    returns = returns.detach()
    loss = (values - returns) ** 2
    if clip_range is not None:
        clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
        loss = torch.maximum(loss, (clipped - returns) ** 2)
    return aggregate(0.5 * loss, mask, aggregation, num_tokens, num_seqs)


def ppo_clip_loss(
    logp: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    aggregation: str = "token_mean",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip policy loss ``L = −min(ρ·A, clip(ρ, 1 − ε, 1 + ε_high)·A)`` (paper Eq. 2).

    ``ρ = exp(logp − logp_old)``; ``ε_high`` is DAPO's asymmetric upper clip (None → ``ε``).
    ``token_weights`` ``w_t`` multiply each token's loss before aggregation: the truncated
    importance weights ``min(π_old / π_sampler, C)`` that correct for a rollout engine whose
    probabilities differ from the trainer's (Yao et al. 2025, "Your efficient RL framework
    secretly brings you off-policy RL training"; TRL's and verl's ``tis``).

    Args:
        logp: ``(B, T)`` float, ``log π_θ(y_t | s_t)``.
        logp_old: ``(B, T)`` float, ``log π_old(y_t | s_t)``.
        advantages: ``(B, T)`` float, ``Â_t`` (detached here).
        mask: ``(B, T)`` bool.
        clip_eps: ε.
        clip_eps_high: upper ε; None uses ``clip_eps``.
        aggregation: see :func:`aggregate`.
        num_tokens: see :func:`aggregate`.
        num_seqs: see :func:`aggregate`.
        token_weights: ``(B, T)`` float or None, per-token weights (detached here).

    Returns:
        ``(loss, stats)``; ``stats`` holds detached 0-d tensors over this batch's valid tokens:
        ``clipfrac`` (fraction where the clipped term is the max, i.e. the gradient is cut; as
        TRL and verl), ``approx_kl`` (k3 of new vs old, ``mean((ρ − 1) − log ρ)``),
        ``ratio_mean``, ``ratio_max``.
    """
    advantages = advantages.detach()
    high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = torch.where(mask, logp - logp_old, 0.0)  # padded logp may be anything
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + high)
    loss_tokens = torch.maximum(unclipped, clipped)
    if token_weights is not None:
        loss_tokens = loss_tokens * token_weights.detach()
    loss = aggregate(loss_tokens, mask, aggregation, num_tokens, num_seqs)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(logp.dtype), mask),
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": ratio.masked_fill(~mask, float("-inf")).max(),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the softmax at each position: ``H = logsumexp(z) − Σ_v softmax(z)_v·z_v``.

    Args:
        logits: ``(..., V)`` float.

    Returns:
        ``(...)`` float32 (computed in float32 even for bf16 logits).
    """
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(-1)
