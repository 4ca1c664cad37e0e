"""The sampler's transform of the logits: what a rollout engine actually samples from.

A sampled token is drawn from ``softmax(f(z))``, where ``f`` is, in this order (Hugging Face
``generate``'s logits processors then warpers, and vLLM's v1 sampler, alike):

1. **min-tokens**: the end tokens get ``−∞`` while fewer than ``min_new_tokens`` tokens have
   been generated (``MinNewTokensLengthLogitsProcessor``; vLLM's ``min_tokens``);
2. **temperature**: ``z / T`` (``TemperatureLogitsWarper``; vLLM ``apply_temperature``);
3. **top-k**: ``−∞`` on every logit strictly below the k-th largest, so ties with the k-th are
   kept (``TopKLogitsWarper``; vLLM ``apply_top_k_only`` / ``apply_top_k_top_p_pytorch``);
4. **top-p**: over the top-k-masked logits sorted ascending, ``−∞`` wherever the cumulative
   probability up to and including the token is ``≤ 1 − p``; the most likely token is always
   kept (``TopPLogitsWarper`` with ``min_tokens_to_keep=1``; vLLM
   ``apply_top_k_top_p_pytorch``). Equivalently: a token is kept iff the probability of the
   tokens sorted above it is ``< p``. Ties at the boundary fall in sort order (unspecified in
   both engines; this module sorts stably).

The log-probs of that distribution, ``log softmax(f(z))[y]``, are what vLLM reports with
``logprobs_mode="processed_logprobs"``. :func:`transform_logits` applies ``f`` to a chunk of
logits in place; the per-token log-prob ops
(:mod:`dvpo_lightning.ops.token_logps`) call it inside their row chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LogitTransform:
    """What the sampler does to the logits before its softmax (see the module docstring).

    Args:
        temperature: divide the logits by this (> 0).
        top_k: keep the ``top_k`` largest logits (and any tied with the k-th); 0: all.
        top_p: keep the smallest most-likely set whose probability reaches ``top_p``; 1: all.
        min_new_tokens: the ``end_ids`` are impossible at response positions ``< min_new_tokens``.
        end_ids: the tokens ``min_new_tokens`` suppresses.
        keep_target: the scored token is always in the kept set (its log-prob is then finite:
            exact whenever the token is in the sampler's kept set, which a sampled token is).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_new_tokens: int = 0
    end_ids: tuple[int, ...] = ()
    keep_target: bool = True

    def __post_init__(self) -> None:
        if not (self.temperature > 0 and self.top_k >= 0 and 0 < self.top_p <= 1
                and self.min_new_tokens >= 0):
            raise ValueError(f"LogitTransform: temperature must be > 0, top_k >= 0, top_p in "
                             f"(0, 1] and min_new_tokens >= 0; got {self}")

    @property
    def identity(self) -> bool:
        """``f(z) = z``: the plain log-softmax, computed by the untransformed code path."""
        return (self.temperature == 1.0 and self.top_k == 0 and self.top_p == 1.0
                and (self.min_new_tokens == 0 or not self.end_ids))

    @property
    def truncates(self) -> bool:
        """Some logits may become ``−∞`` (top-k, top-p or min-tokens)."""
        return self.top_k > 0 or self.top_p < 1.0 or (self.min_new_tokens > 0
                                                       and bool(self.end_ids))


def active(transform: LogitTransform | None) -> LogitTransform | None:
    """``transform``, or None when it changes nothing (the untransformed path runs then)."""
    return None if transform is None or transform.identity else transform


def transform_logits(z: Tensor, transform: LogitTransform, targets: Tensor | None = None,
                     first_position: int = 0) -> Tensor:
    """``f(z)`` (the module docstring), written into ``z`` and returned.

    Args:
        z: ``(…, T, V)`` float logits, overwritten; column ``t`` is response position
            ``first_position + t``.
        transform: the sampler's settings.
        targets: ``(…, T)`` the scored tokens, kept whatever their rank when
            ``transform.keep_target``; None: nothing forced in.
        first_position: the response position of ``z``'s first column (min-tokens).

    Returns:
        ``z`` with ``z / T`` on the kept set and ``−∞`` elsewhere. Peak extra memory: one bool
        mask of ``z``'s shape, plus a sort (values and int64 indices) with ``top_p < 1``.
    """
    if transform.temperature != 1.0:
        z.div_(transform.temperature)
    if not transform.truncates:
        return z
    drop = torch.zeros(z.shape, dtype=torch.bool, device=z.device)
    cut = transform.min_new_tokens - first_position
    if cut > 0 and transform.end_ids:
        ends = torch.tensor(transform.end_ids, device=z.device)
        drop[..., :cut, :].index_fill_(-1, ends, True)
    if transform.top_k > 0 and transform.top_k < z.shape[-1]:
        kth = z.masked_fill(drop, float("-inf")).topk(transform.top_k, -1).values[..., -1:]
        drop |= z < kth
    if transform.top_p < 1.0:
        masked = z.masked_fill(drop, float("-inf"))
        sorted_z, order = masked.sort(stable=True, dim=-1)  # ascending
        cum = sorted_z.softmax(-1).cumsum_(-1)
        gone = cum <= 1 - transform.top_p
        gone[..., -1] = False  # the most likely token stays
        drop |= torch.zeros_like(drop).scatter_(-1, order, gone)
    if transform.keep_target and targets is not None:
        drop.scatter_(-1, targets[..., None], False)
    return z.masked_fill_(drop, float("-inf"))
