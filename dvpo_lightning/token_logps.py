"""Per-token log-probs (and entropies) from a vocabulary-wide logits tensor, in row chunks.

The plain way, ``logits.float().log_softmax(-1).gather(...)``, keeps a float32 copy of the
whole ``(B, T, V)`` tensor for the backward pass and builds two more while running: about
12 bytes per logit on top of the logits themselves. On a 150k vocabulary (Qwen2.5) a batch of
32 × 384 tokens is 1.9 G logits, 22 GB. :func:`token_logps` computes the same numbers a chunk
of rows at a time in float32 and saves only the logits (their own dtype, bf16 under autocast)
and one log-normaliser per token; its backward writes ``∂/∂z`` directly, chunk by chunk, in
the logits' dtype. Peak extra memory is one chunk in float32 (two with the entropy).

Math (softmax ``p = exp(z − lse)``, ``lse = log Σ_v exp z_v``):

- ``log π(y) = z_y − lse``, and ``∂ log π(y) / ∂z_v = 1[v = y] − p_v``;
- ``H = lse − Σ_v p_v z_v`` (a metric here: returned without a gradient).
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_CHUNK_TOKENS = 1024
"""Tokens per float32 chunk: 1024 × a 150k vocabulary is 0.6 GB."""


def _row_chunks(rows: int, width: int, chunk_tokens: int):
    step = max(1, chunk_tokens // max(width, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


class _TokenLogps(torch.autograd.Function):
    """One float32 buffer per chunk, updated in place (plus one more for the entropy)."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, offset: int, chunk_tokens: int,
                with_entropy: bool) -> tuple[Tensor, Tensor]:
        b, t = targets.shape
        cols = slice(offset, offset + t)
        acc = torch.promote_types(logits.dtype, torch.float32)  # float64 stays float64
        lse = torch.empty(b, t, dtype=acc, device=logits.device)
        entropy = torch.empty_like(lse) if with_entropy else lse.new_empty(0)
        for rows in _row_chunks(b, t, chunk_tokens):
            w = logits[rows, cols].to(acc, copy=True)
            m = w.amax(-1, keepdim=True)
            w.sub_(m)  # w = z − max z ≤ 0
            e = torch.exp(w) if with_entropy else w.exp_()
            total = e.sum(-1)  # Σ exp(z − m) ≥ 1
            lse[rows] = m.squeeze(-1) + total.log()
            if with_entropy:  # H = log Σe − Σ e·w / Σe
                entropy[rows] = total.log() - e.mul_(w).sum(-1) / total
        picked = logits[:, cols].gather(2, targets[..., None]).squeeze(-1).to(acc)
        ctx.save_for_backward(logits, targets, lse)
        ctx.offset, ctx.chunk_tokens = offset, chunk_tokens
        ctx.mark_non_differentiable(entropy)
        return picked - lse, entropy

    @staticmethod
    def backward(ctx, grad_logp: Tensor, _grad_entropy: Tensor):
        logits, targets, lse = ctx.saved_tensors
        b, t = targets.shape
        cols = slice(ctx.offset, ctx.offset + t)
        grad = torch.zeros_like(logits)  # columns outside [offset, offset + T) get none
        g = grad_logp.to(lse.dtype)
        for rows in _row_chunks(b, t, ctx.chunk_tokens):
            dz = logits[rows, cols].to(lse.dtype, copy=True)
            dz.sub_(lse[rows, :, None]).exp_().mul_(-g[rows, :, None])  # −g·p
            dz.scatter_add_(2, targets[rows, :, None], g[rows, :, None])  # + g·1[v = y]
            grad[rows, cols] = dz
        return grad, None, None, None, None


def token_logps(logits: Tensor, targets: Tensor, offset: int = 0,
                chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """``log softmax(z)[y]`` at each target, and optionally the entropy, without a float32
    copy of the whole logits.

    Args:
        logits: ``(B, L, V)`` any float dtype; columns ``offset … offset + T − 1`` are used
            (the rest get a zero gradient), so a caller need not slice, and copy, the logits.
        targets: ``(B, T)`` int64 token ids, ``T ≤ L − offset``.
        offset: the column of ``logits`` that predicts ``targets[:, 0]``.
        chunk_tokens: about this many tokens (whole rows, at least one) per float32 chunk.
        with_entropy: also return the per-token entropy (no gradient flows through it).

    Returns:
        ``(logp (B, T), entropy (B, T) or None)``, float32 (float64 for float64 logits); equal to
        ``logits[:, offset:offset+T].float().log_softmax(-1).gather(2, targets[..., None])``
        and :func:`~dvpo_lightning.losses.entropy_from_logits` of the same columns.
    """
    if targets.shape[1] > logits.shape[1] - offset:
        raise ValueError(f"token_logps: {targets.shape[1]} targets from column {offset} do not "
                         f"fit in {logits.shape[1]} logit columns")
    logp, entropy = _TokenLogps.apply(logits, targets, offset, chunk_tokens, with_entropy)
    return logp, (entropy if with_entropy else None)
