"""Forward passes over ``[prompt | response]`` that rollouts and updates share.

All take the shared layout (left-padded prompt ``(B, P)``, right-padded response ``(B, T)``)
and return tensors aligned as in docs/algorithm.md: log-probs ``(B, T)`` of ``y_1 … y_T``,
values ``(B, T + 1)`` = ``u_0 … u_T``, scores ``(B,)`` at the last response token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from dvpo_lightning.data.collate import join
from dvpo_lightning.models.loading import forward_accepts, position_ids_from_mask, unwrapped
from dvpo_lightning.ops.sampling import LogitTransform
from dvpo_lightning.ops.token_logps import head_token_logps, token_logps


def policy_logps(policy: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor,
                 response_ids: Tensor, response_mask: Tensor, with_entropy: bool = False,
                 fused_head: bool = True,
                 sampling: LogitTransform | None = None) -> tuple[Tensor, Tensor | None]:
    """``log π(y_t | s_t)`` ``(B, T)`` (and the per-token entropy, without gradient, when
    asked), float32, zero where ``response_mask`` is.

    ``sampling``: score the distribution a sampler draws from, ``softmax(f(logits))`` with
    ``f`` its temperature, top-k, top-p and min-tokens
    (:class:`~dvpo_lightning.ops.sampling.LogitTransform`); None (or a transform that changes
    nothing): the model's own ``softmax(logits)``, computed exactly as without the argument.

    Logits at column ``P − 1 + (t − 1)`` predict ``y_t``. Only the response's columns get
    log-probs, computed in float32 row chunks (:mod:`dvpo_lightning.ops.token_logps`):

    - ``fused_head`` and a model whose logits are exactly ``body(x) @ headᵀ`` (Llama, Mistral,
      Qwen2, Qwen3; not under ZeRO-3 nor with an adapted head, see :func:`fused_head_parts`):
      the head runs inside the chunks, so the ``(B, T, V)`` logits never exist at once
      (recomputed chunk by chunk in the backward);
    - otherwise a model whose ``forward`` takes ``logits_to_keep`` runs its head over the last
      ``T + 1`` columns only; any other model over every column.
    """
    ids, mask = join(prompt_ids, prompt_mask, response_ids, response_mask)
    t = response_ids.shape[1]
    inputs = {"input_ids": ids, "attention_mask": mask.long(),
              "position_ids": position_ids_from_mask(mask), "use_cache": False}
    parts = fused_head_parts(policy) if fused_head else None
    if parts is not None:
        body, weight = parts
        hidden = body(**inputs).last_hidden_state
        logp, entropy = head_token_logps(hidden, weight, response_ids, prompt_ids.shape[1] - 1,
                                         with_entropy=with_entropy, sampling=sampling)
        return logp * response_mask, entropy
    keep = {"logits_to_keep": t + 1} if forward_accepts(policy, "logits_to_keep") else {}
    out = policy(**inputs, **keep)
    offset = out.logits.shape[1] - t - 1  # 0 with logits_to_keep, P - 1 without
    logp, entropy = token_logps(out.logits, response_ids, offset, with_entropy=with_entropy,
                                sampling=sampling)
    return logp * response_mask, entropy


FUSED_HEAD_CLASSES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                      "Qwen3ForCausalLM")
"""Causal LMs whose ``forward`` is ``lm_head(model(…).last_hidden_state)``, nothing more (no
logit scaling or soft-capping), so the head can be applied outside it."""


def fused_head_parts(policy: nn.Module) -> tuple[nn.Module, Tensor] | None:
    """``(body, head weight)`` when ``policy``'s logits are exactly
    ``body(…).last_hidden_state @ weightᵀ``, else None: a class outside
    :data:`FUSED_HEAD_CLASSES`, a prompt-learning adapter, an adapted or biased head, or a
    ZeRO-3 partitioned head (its weight is gathered only inside the head's own forward)."""
    base = unwrapped(policy)
    if type(base).__name__ not in FUSED_HEAD_CLASSES:
        return None
    peft_config = getattr(policy, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return None
    head = base.get_output_embeddings()
    if type(head) is not nn.Linear or head.bias is not None or hasattr(head.weight, "ds_id"):
        return None
    return base.model, head.weight


def response_values(value_model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor,
                    response_ids: Tensor, response_mask: Tensor) -> Tensor:
    """``u_0 … u_T``: ``(B, T + 1)`` value-head outputs from the last prompt token on."""
    ids, mask = join(prompt_ids, prompt_mask, response_ids, response_mask)
    return value_model(ids, mask)[:, prompt_ids.shape[1] - 1:]


def final_scores(values: Tensor, response_mask: Tensor) -> Tensor:
    """``(B,)``: ``u_L`` at each row's last response token, ``L`` its length."""
    last = response_mask.long().sum(1)
    return values.gather(1, last[:, None]).squeeze(1)


def sequence_scores(reward_model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor,
                    response_ids: Tensor, response_mask: Tensor) -> Tensor:
    """The reward model's score ``r(x, y)`` ``(B,)`` at the last response token."""
    values = response_values(reward_model, prompt_ids, prompt_mask, response_ids, response_mask)
    return final_scores(values, response_mask)


def by_rows(fn: Callable[..., Tensor], rows: int | None, *tensors: Tensor) -> Tensor:
    """``fn(*tensors)`` computed ``rows`` rows at a time and concatenated along dim 0.

    A forward pass's activation memory grows with its rows; scoring a whole rollout batch in
    slices keeps it bounded while generation still runs on the whole batch. Each row's
    result does not depend on the other rows, so only the memory changes. ``rows`` None (or
    at least the batch) is one call.
    """
    n = tensors[0].shape[0]
    if rows is None or rows >= n:
        return fn(*tensors)
    return torch.cat([fn(*(t[i:i + rows] for t in tensors)) for i in range(0, n, rows)])
