"""Forward passes over ``[prompt | response]`` that rollouts and updates share.

All take the shared layout (left-padded prompt ``(B, P)``, right-padded response ``(B, T)``)
and return response-aligned tensors (ALGORITHM.md): log-probs ``(B, T)`` of ``y_1 … y_T``,
values ``(B, T + 1)`` = ``u_0 … u_T``, scores ``(B,)`` at the last response token.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dvpo_lightning.losses import entropy_from_logits
from dvpo_lightning.models.loading import position_ids_from_mask


def _join(prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
          response_mask: Tensor) -> tuple[Tensor, Tensor]:
    return (torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask, response_mask], 1))


def policy_logps(policy: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor,
                 response_ids: Tensor, response_mask: Tensor,
                 with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """``log π(y_t | s_t)`` ``(B, T)`` (and the per-token entropy when asked), float32.

    Logits at column ``P − 1 + (t − 1)`` predict ``y_t``; only those ``T`` columns are turned
    into log-probs, so the full-vocabulary softmax is never built for the prompt.
    """
    ids, mask = _join(prompt_ids, prompt_mask, response_ids, response_mask)
    out = policy(input_ids=ids, attention_mask=mask.long(),
                 position_ids=position_ids_from_mask(mask), use_cache=False)
    p = prompt_ids.shape[1]
    logits = out.logits[:, p - 1:-1].float()
    logp = torch.gather(logits.log_softmax(-1), 2, response_ids[..., None]).squeeze(-1)
    entropy = entropy_from_logits(logits) if with_entropy else None
    return logp * response_mask, entropy


def response_values(value_model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor,
                    response_ids: Tensor, response_mask: Tensor) -> Tensor:
    """``u_0 … u_T``: ``(B, T + 1)`` value-head outputs from the last prompt token on."""
    ids, mask = _join(prompt_ids, prompt_mask, response_ids, response_mask)
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
