"""Per-token log-probs (and entropies) over a vocabulary, in row chunks.

The plain way, ``logits.float().log_softmax(-1).gather(...)``, keeps a float32 copy of the
whole ``(B, T, V)`` tensor for the backward pass and builds two more while running: about
12 bytes per logit on top of the logits themselves. On a 150k vocabulary (Qwen2.5) a batch of
32 × 384 tokens is 1.9 G logits, 22 GB. :func:`token_logps` computes the same numbers a chunk
of rows at a time in float32 and saves only the logits (their own dtype, bf16 under autocast)
and one log-normaliser per token; its backward writes ``∂/∂z`` directly, chunk by chunk, in
the logits' dtype. Peak extra memory is one chunk in float32 (two with the entropy).
:func:`head_token_logps` goes further and takes the final hidden states and the output head:
the logits then exist one chunk at a time, and the backward recomputes each chunk's (one more
head matmul for ``(B, T, V)`` bytes less).

Math (softmax ``p = exp(z − lse)``, ``lse = log Σ_v exp z_v``):

- ``log π(y) = z_y − lse``, and ``∂ log π(y) / ∂z_v = 1[v = y] − p_v``;
- ``H = lse − Σ_v p_v z_v`` (a metric here: returned without a gradient).

With a ``sampling`` transform (:mod:`dvpo_lightning.ops.sampling`: temperature, top-k, top-p,
min-tokens) each chunk's logits become ``z' = f(z)`` (``z / T`` on the kept set, ``−∞`` off it)
before the same math, and the backward applies the chain rule ``∂/∂z_v = (1/T)·∂/∂z'_v`` on the
kept set, 0 off it (the kept set is piecewise constant in ``z``). The kept set is recomputed
in the backward (a stable sort: the same set). Without one, or with one that changes nothing
(T = 1, top-k 0, top-p 1), the code runs exactly as before, to the bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dvpo_lightning.ops.sampling import LogitTransform, active, transform_logits

DEFAULT_CHUNK_TOKENS = 1024
"""Tokens per float32 chunk: 1024 × a 150k vocabulary is 0.6 GB."""


def _row_chunks(rows: int, width: int, chunk_tokens: int):
    step = max(1, chunk_tokens // max(width, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def _head_logits(hidden: Tensor, weight: Tensor) -> Tensor:
    """``hidden @ weightᵀ`` for ``hidden (n, t, H)`` — a column slice of the body's output, so
    not contiguous — as one ``(n·t, H) @ (H, V)`` product. Handed the 3-D slice, ``matmul``
    cannot fold it into one matrix and broadcasts the ``(V, H)`` weight to a batched product,
    copying it once per row: measured at the SmolLM2-135M shape on CPU, 1.7× slower in float32
    and 15× in bfloat16 than this."""
    n, t, width = hidden.shape
    return (hidden.reshape(n * t, width) @ weight.T).view(n, t, -1)


def _normaliser(z: Tensor, with_entropy: bool,
                truncated: bool = False) -> tuple[Tensor, Tensor | None]:
    """``lse (…)`` and the entropy (or None) of a float chunk ``z (…, V)``, which it
    overwrites (one buffer: ``z − max z``, then its exponential). ``truncated``: ``z`` may hold
    ``−∞`` (whose ``p·z`` term is 0 in the entropy)."""
    m = z.amax(-1, keepdim=True)
    w = z.sub_(m)  # w = z − max z ≤ 0
    e = torch.exp(w) if with_entropy else w.exp_()
    total = e.sum(-1)  # Σ exp(z − m) ≥ 1
    lse = m.squeeze(-1) + total.log()
    if not with_entropy:
        return lse, None
    if truncated:
        w = w.nan_to_num_(neginf=0.0)  # p = 0 there: 0·(−∞) is a 0 term, not NaN
    return lse, total.log() - e.mul_(w).sum(-1) / total  # H = log Σe − Σ e·w / Σe


def _dlogp_dz(z: Tensor, lse: Tensor, g: Tensor, targets: Tensor) -> Tensor:
    """``g · (1[v = y] − p_v)`` for a float chunk ``z (r, T, V)`` (overwritten and returned),
    its ``lse (r, T)``, upstream gradient ``g (r, T)`` and targets ``(r, T)``."""
    dz = z.sub_(lse[..., None]).exp_().mul_(-g[..., None])  # −g·p
    return dz.scatter_add_(2, targets[..., None], g[..., None])  # + g·1[v = y]


def _dlogp_dz_sampled(z: Tensor, lse: Tensor, g: Tensor, targets: Tensor,
                      sampling: LogitTransform) -> Tensor:
    """:func:`_dlogp_dz` through the sampler's transform ``z' = f(z)``: ``(g / T)·(1[v = y] −
    p'_v)`` on the kept set (``p' = softmax(z')``, 0 off it), 0 everywhere for a target off the
    kept set (its log-prob is the constant ``−∞``)."""
    z = transform_logits(z, sampling, targets)
    g = g / sampling.temperature
    if sampling.truncates and not sampling.keep_target:
        g = g.masked_fill(z.gather(2, targets[..., None]).squeeze(-1).isneginf(), 0.0)
    return _dlogp_dz(z, lse, g, targets)


class _TokenLogps(torch.autograd.Function):
    """One float32 buffer per chunk, updated in place (plus one more for the entropy)."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, offset: int, chunk_tokens: int,
                with_entropy: bool, sampling: LogitTransform | None) -> tuple[Tensor, Tensor]:
        b, t = targets.shape
        cols = slice(offset, offset + t)
        acc = torch.promote_types(logits.dtype, torch.float32)  # float64 stays float64
        lse = torch.empty(b, t, dtype=acc, device=logits.device)
        entropy = torch.empty_like(lse) if with_entropy else lse.new_empty(0)
        if sampling is None:
            for rows in _row_chunks(b, t, chunk_tokens):
                lse[rows], ent = _normaliser(logits[rows, cols].to(acc, copy=True), with_entropy)
                if with_entropy:
                    entropy[rows] = ent
            picked = logits[:, cols].gather(2, targets[..., None]).squeeze(-1).to(acc)
        else:
            picked = torch.empty_like(lse)
            for rows in _row_chunks(b, t, chunk_tokens):
                z = transform_logits(logits[rows, cols].to(acc, copy=True), sampling,
                                     targets[rows])
                picked[rows] = z.gather(2, targets[rows, :, None]).squeeze(-1)
                lse[rows], ent = _normaliser(z, with_entropy, sampling.truncates)
                if with_entropy:
                    entropy[rows] = ent
        ctx.save_for_backward(logits, targets, lse)
        ctx.offset, ctx.chunk_tokens, ctx.sampling = offset, chunk_tokens, sampling
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
            z = logits[rows, cols].to(lse.dtype, copy=True)
            if ctx.sampling is None:
                grad[rows, cols] = _dlogp_dz(z, lse[rows], g[rows], targets[rows])
            else:
                grad[rows, cols] = _dlogp_dz_sampled(z, lse[rows], g[rows], targets[rows],
                                                     ctx.sampling)
        return grad, None, None, None, None, None


class _HeadTokenLogps(torch.autograd.Function):
    """The output head inside the chunks: logits exist one chunk at a time, forward and
    backward (where each chunk's are recomputed)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, offset: int,
                chunk_tokens: int, with_entropy: bool, compute_dtype: torch.dtype,
                sampling: LogitTransform | None):
        b, t = targets.shape
        cols = slice(offset, offset + t)
        acc = torch.promote_types(compute_dtype, torch.float32)
        w = weight.to(compute_dtype)
        lse = torch.empty(b, t, dtype=acc, device=hidden.device)
        picked = torch.empty_like(lse)
        entropy = torch.empty_like(lse) if with_entropy else lse.new_empty(0)
        for rows in _row_chunks(b, t, chunk_tokens):
            z = _head_logits(hidden[rows, cols].to(compute_dtype), w).to(acc)
            if sampling is not None:
                z = transform_logits(z, sampling, targets[rows])
            picked[rows] = z.gather(2, targets[rows, :, None]).squeeze(-1)
            lse[rows], ent = _normaliser(z, with_entropy,
                                         sampling is not None and sampling.truncates)
            if with_entropy:
                entropy[rows] = ent
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.offset, ctx.chunk_tokens, ctx.compute_dtype = offset, chunk_tokens, compute_dtype
        ctx.sampling = sampling
        ctx.mark_non_differentiable(entropy)
        return picked - lse, entropy

    @staticmethod
    def backward(ctx, grad_logp: Tensor, _grad_entropy: Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        b, t = targets.shape
        cols = slice(ctx.offset, ctx.offset + t)
        cdt = ctx.compute_dtype
        w = weight.to(cdt)
        grad_h = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = (torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device)
                  if ctx.needs_input_grad[1] else None)
        g = grad_logp.to(lse.dtype)
        for rows in _row_chunks(b, t, ctx.chunk_tokens):
            h = hidden[rows, cols].to(cdt).flatten(0, 1)  # (n·t, H): one copy, used twice
            z = (h @ w.T).view(*targets[rows].shape, -1).to(lse.dtype)
            dz = (_dlogp_dz(z, lse[rows], g[rows], targets[rows]) if ctx.sampling is None else
                  _dlogp_dz_sampled(z, lse[rows], g[rows], targets[rows], ctx.sampling)).to(cdt)
            if grad_h is not None:
                grad_h[rows, cols] = dz @ w
            if grad_w is not None:
                grad_w += (dz.flatten(0, 1).T @ h).to(grad_w.dtype)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None, None


def head_token_logps(hidden: Tensor, weight: Tensor, targets: Tensor, offset: int = 0,
                     chunk_tokens: int = DEFAULT_CHUNK_TOKENS, with_entropy: bool = False,
                     sampling: LogitTransform | None = None) -> tuple[Tensor, Tensor | None]:
    """:func:`token_logps` of ``logits = hidden @ weightᵀ`` without ever holding the whole
    logits: each chunk's are computed, reduced and dropped, and recomputed in the backward.

    Args:
        hidden: ``(B, L, H)`` final hidden states (after the last norm).
        weight: ``(V, H)`` the output head's weight (no bias).
        targets, offset, chunk_tokens, with_entropy, sampling: as :func:`token_logps`.

    Under autocast the head runs in the autocast dtype (as ``nn.Linear`` would) and the
    weight's gradient is accumulated in float32 over the chunks.

    Returns:
        As :func:`token_logps`; gradients flow to ``hidden`` and ``weight``.
    """
    _check_width(hidden, targets, offset)
    device = hidden.device.type
    dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
             else torch.promote_types(hidden.dtype, weight.dtype))
    with torch.autocast(device, enabled=False):
        logp, entropy = _HeadTokenLogps.apply(hidden, weight, targets, offset, chunk_tokens,
                                              with_entropy, dtype, active(sampling))
    return logp, (entropy if with_entropy else None)


def _check_width(logits: Tensor, targets: Tensor, offset: int) -> None:
    if targets.shape[1] > logits.shape[1] - offset:
        raise ValueError(f"token_logps: {targets.shape[1]} targets from column {offset} do not "
                         f"fit in {logits.shape[1]} logit columns")


def token_logps(logits: Tensor, targets: Tensor, offset: int = 0,
                chunk_tokens: int = DEFAULT_CHUNK_TOKENS, with_entropy: bool = False,
                sampling: LogitTransform | None = None) -> tuple[Tensor, Tensor | None]:
    """``log softmax(f(z))[y]`` at each target, and optionally the entropy, without a float32
    copy of the whole logits; ``f`` is the sampler's transform (identity by default).

    Args:
        logits: ``(B, L, V)`` any float dtype; columns ``offset … offset + T − 1`` are used
            (the rest get a zero gradient), so a caller need not slice, and copy, the logits.
        targets: ``(B, T)`` int64 token ids, ``T ≤ L − offset``.
        offset: the column of ``logits`` that predicts ``targets[:, 0]``.
        chunk_tokens: about this many tokens (whole rows, at least one) per float32 chunk.
        with_entropy: also return the per-token entropy (no gradient flows through it).
        sampling: the sampler's transform of the logits
            (:class:`~dvpo_lightning.ops.sampling.LogitTransform`: temperature, top-k, top-p,
            min-tokens; column ``offset`` is response position 0); the log-probs and entropy
            are then those of the distribution the sampler draws from. None, or a transform
            that changes nothing: the plain log-softmax, by the untransformed code.

    Returns:
        ``(logp (B, T), entropy (B, T) or None)``, float32 (float64 for float64 logits); equal to
        ``logits[:, offset:offset+T].float().log_softmax(-1).gather(2, targets[..., None])``
        and :func:`~dvpo_lightning.ops.losses.entropy_from_logits` of the same columns.
    """
    _check_width(logits, targets, offset)
    logp, entropy = _TokenLogps.apply(logits, targets, offset, chunk_tokens, with_entropy,
                                      active(sampling))
    return logp, (entropy if with_entropy else None)
