"""Generation behind a small interface, and the reference engine (Hugging Face ``generate``).

A generator takes left-padded prompts and returns right-padded responses whose mask is True
on ``y_1 … y_T`` up to and including the first EOS and False after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn


@dataclass
class SamplingConfig:
    """Sampling settings of a rollout.

    Args:
        max_new_tokens: longest response, in tokens.
        temperature: softmax temperature (ignored when ``greedy``).
        top_p: nucleus sampling mass; 1.0 disables it.
        top_k: keep the k most likely tokens; 0 disables it.
        greedy: take the arg-max token (evaluation, ReMax's baseline).
        min_new_tokens: force at least this many tokens (cost benchmarks force a length).
    """

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    min_new_tokens: int = 0


class Generator(Protocol):
    def generate(self, model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor,
                 cfg: SamplingConfig) -> tuple[Tensor, Tensor]:
        """``(B, P)`` left-padded prompts → ``(B, T)`` response ids and ``(B, T) bool`` mask."""


def mask_after_eos(response_ids: Tensor, eos_id: int) -> Tensor:
    """``(B, T) bool``: True up to and including the first EOS of each row, False after."""
    is_eos = response_ids == eos_id
    after = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    return ~after


class HFGenerator:
    """``model.generate`` with a KV cache; masks and pads after the first EOS.

    Args:
        eos_token_id: the token that ends a response.
        pad_token_id: written after EOS.
    """

    def __init__(self, eos_token_id: int, pad_token_id: int) -> None:
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id

    @torch.no_grad()
    def generate(self, model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor,
                 cfg: SamplingConfig) -> tuple[Tensor, Tensor]:
        kwargs = dict(
            max_new_tokens=cfg.max_new_tokens,
            min_new_tokens=cfg.min_new_tokens or None,
            do_sample=not cfg.greedy,
            # Always passed: with min == max the min-length processor then suppresses EOS and
            # the length is forced (None fell back to the model's config and EOS still ended
            # responses early).
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            use_cache=True,
        )
        if not cfg.greedy:
            kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask.long(), **kwargs)
        response = out[:, prompt_ids.shape[1]:]
        if response.shape[1] == 0:
            response = torch.full((prompt_ids.shape[0], 1), self.eos_token_id,
                                  dtype=prompt_ids.dtype, device=prompt_ids.device)
        mask = mask_after_eos(response, self.eos_token_id)
        return response.masked_fill(~mask, self.pad_token_id), mask
