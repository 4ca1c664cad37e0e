"""Generation behind one interface, and the reference engine (Hugging Face ``generate``).

A generator (a rollout engine) takes left-padded prompts and returns right-padded responses
whose mask is True on ``y_1 … y_T`` up to and including the first EOS and False after it, and,
when the engine reports them, the log-probs it sampled with (:class:`Samples`). Engines:
:class:`HFGenerator` here (the exact reference) and
:class:`~dvpo_lightning.rollout.vllm_engine.VLLMEngine` (a colocated vLLM engine).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch import Tensor, nn

from dvpo_lightning.runtime.distributed import rank_rng


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


class Samples(NamedTuple):
    """What a generator returns.

    Attributes:
        response_ids: ``(B, T) long``, right-padded, the pad token after the first EOS.
        response_mask: ``(B, T) bool``, True on ``y_1 … y_T`` up to and including EOS.
        logps: ``(B, T) float`` or None: ``log π(y_t | s_t)`` as the engine computed it while
            sampling (raw log-softmax of its logits, 0 where masked); None when the engine does
            not report it (``generate``).
    """

    response_ids: Tensor
    response_mask: Tensor
    logps: Tensor | None = None


class Generator(Protocol):
    """A rollout engine."""

    name: str

    def generate(self, model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor,
                 cfg: SamplingConfig, weights_version: int | None = None) -> Samples:
        """Responses of ``model`` to ``(B, P)`` left-padded prompts.

        Args:
            model: the policy to sample from.
            prompt_ids: ``(B, P) long``.
            prompt_mask: ``(B, P) bool``.
            cfg: the sampling settings.
            weights_version: how many optimizer updates ``model``'s weights have had; an engine
                that keeps its own copy of the weights reloads them when it differs from the
                version it holds (None: reload unconditionally).
        """


def mask_after_eos(response_ids: Tensor, eos_id: int) -> Tensor:
    """``(B, T) bool``: True up to and including the first EOS of each row, False after."""
    is_eos = response_ids == eos_id
    after = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    return ~after


class HFGenerator:
    """``model.generate`` with a KV cache; masks and pads after the first EOS. It samples from
    ``model`` itself, so there are no weights to keep in sync.

    Args:
        eos_token_id: the token that ends a response.
        pad_token_id: written after EOS.
    """

    name = "hf"

    def __init__(self, eos_token_id: int, pad_token_id: int) -> None:
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id

    @torch.no_grad()
    def generate(self, model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor,
                 cfg: SamplingConfig, weights_version: int | None = None) -> Samples:
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
        # sampled: each data-parallel rank from its own stream (one process: the global RNG)
        with contextlib.nullcontext() if cfg.greedy else rank_rng(prompt_ids.device):
            out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask.long(),
                                 **kwargs)
        response = out[:, prompt_ids.shape[1]:]
        if response.shape[1] == 0:
            response = torch.full((prompt_ids.shape[0], 1), self.eos_token_id,
                                  dtype=prompt_ids.dtype, device=prompt_ids.device)
        mask = mask_after_eos(response, self.eos_token_id)
        return Samples(response.masked_fill(~mask, self.pad_token_id), mask)
