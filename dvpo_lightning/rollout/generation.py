"""Generation behind one interface, and the reference engine (Hugging Face ``generate``).

A generator (a rollout engine) takes left-padded prompts and returns right-padded responses
whose mask is True on ``y_1 … y_T`` up to and including the first end token (any id of
:func:`~dvpo_lightning.rollout.end_tokens.end_token_ids`) and False after it, and,
when the engine reports them, the log-probs it sampled with (:class:`Samples`). Engines:
:class:`HFGenerator` here (the exact reference) and
:class:`~dvpo_lightning.rollout.vllm_engine.VLLMEngine` (a colocated vLLM engine).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple, Protocol

import torch
from torch import Tensor, nn
from transformers import LogitsProcessorList

from dvpo_lightning.ops.sampling import LogitTransform, active
from dvpo_lightning.rollout.common_noise import GumbelMax
from dvpo_lightning.rollout.end_tokens import as_end_ids, is_end
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

    def policy_transform(self, end_ids: tuple[int, ...]) -> LogitTransform | None:
        """What the sampler does to the policy's logits (temperature, top-k, top-p, and the
        ``end_ids`` suppressed before ``min_new_tokens``), so the trainer scores the
        distribution a response was drawn from; None when that is the model's own softmax
        (T = 1, no truncation) or when decoding greedily (scored as the model's softmax)."""
        if self.greedy:
            return None
        return active(LogitTransform(self.temperature, self.top_k, self.top_p,
                                     self.min_new_tokens, tuple(end_ids)))

    def reference_transform(self) -> LogitTransform | None:
        """The reference's logits for the KL: the temperature only, never truncated (a
        truncated reference gives ``−∞`` to a sample outside its own kept set); None at T = 1
        or greedy. See docs/sampling.md."""
        if self.greedy:
            return None
        return active(LogitTransform(self.temperature))


class Samples(NamedTuple):
    """What a generator returns.

    Attributes:
        response_ids: ``(B, T) long``, right-padded, the pad token after the first EOS.
        response_mask: ``(B, T) bool``, True on ``y_1 … y_T`` up to and including EOS.
        logps: ``(B, T) float`` or None: ``log π(y_t | s_t)`` as the engine computed it while
            sampling, of the distribution it sampled from (log-softmax of its logits after
            temperature, top-k, top-p and min-tokens; 0 where masked); None when the engine
            does not report it (``generate``).
    """

    response_ids: Tensor
    response_mask: Tensor
    logps: Tensor | None = None


class Generator(Protocol):
    """A rollout engine: what the RL module and the experience maker use of one.

    Attributes:
        name: ``hf`` or ``vllm`` (``model.init_args.rollout.engine``).
        end_ids: the token ids that end a response, the tokenizer's EOS first
            (:func:`~dvpo_lightning.rollout.end_tokens.end_token_ids`).
        last_push_s: seconds the last :meth:`generate` spent loading weights into the engine
            (0.0 for an engine that samples from the model itself).
    """

    name: str
    end_ids: tuple[int, ...]
    last_push_s: float

    def check_servable(self, model: nn.Module, device: torch.device, longest: int) -> None:
        """Refuse, before the first rollout, what this engine cannot serve (raises ValueError
        naming the fix).

        Args:
            model: the policy.
            device: where it runs.
            longest: the longest prompt + response a rollout asks for, in tokens.
        """

    def sleep(self) -> None:
        """Free the engine's memory until the next rollout, where it can (else nothing)."""

    def follow_precision(self, precision: str) -> None:
        """The trainer's precision (Lightning's ``trainer.precision``), which an engine with a
        dtype of its own follows (``rollout.vllm.dtype: auto``); given before the first
        rollout."""

    def generate(self, model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor,
                 cfg: SamplingConfig, weights_version: int | None = None,
                 seeds: Sequence[int] | None = None) -> Samples:
        """Responses of ``model`` to ``(B, P)`` left-padded prompts.

        Args:
            model: the policy to sample from.
            prompt_ids: ``(B, P) long``.
            prompt_mask: ``(B, P) bool``.
            cfg: the sampling settings.
            weights_version: how many optimizer updates ``model``'s weights have had; an engine
                that keeps its own copy of the weights reloads them when it differs from the
                version it holds (None: reload unconditionally).
            seeds: one noise-stream seed per row (common random numbers,
                :mod:`~dvpo_lightning.rollout.common_noise`): row ``r``'s response depends on
                ``seeds[r]`` alone, never on the global RNG; None: the engine's own draws.
        """

    def forget_weights(self) -> None:
        """Assume nothing about the weights held (a checkpoint was loaded into the policy):
        an engine that keeps its own copy reloads it at the next rollout."""


def mask_after_eos(response_ids: Tensor, eos_id: int | Sequence[int]) -> Tensor:
    """``(B, T) bool``: True up to and including the first end token of each row (any id of
    ``eos_id``: one id or a set), False after."""
    is_eos = is_end(response_ids, eos_id)
    after = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    return ~after


class HFGenerator:
    """``model.generate`` with a KV cache; masks and pads after the first end token. It samples
    from ``model`` itself, so there are no weights to keep in sync, nothing to check before the
    first rollout and no memory to free between rollouts.

    Args:
        end_ids: the tokens that end a response (one id, or the set of
            :func:`~dvpo_lightning.rollout.end_tokens.end_token_ids`, the tokenizer's EOS
            first); ``generate`` is given exactly these, never the model config's own.
        pad_token_id: written after the end token.
    """

    name = "hf"
    last_push_s = 0.0  # (no weights to push)

    def __init__(self, end_ids: int | Sequence[int], pad_token_id: int) -> None:
        self.end_ids = as_end_ids(end_ids)
        self.eos_token_id = self.end_ids[0]  # the tokenizer's EOS
        self.pad_token_id = pad_token_id

    def check_servable(self, model: nn.Module, device: torch.device, longest: int) -> None:
        """``generate`` serves any model here (the context is checked by the RL module)."""

    def sleep(self) -> None:
        """Nothing to free: ``generate`` holds no memory between rollouts."""

    def follow_precision(self, precision: str) -> None:
        """Nothing to follow: ``generate`` runs the model itself, in the trainer's precision."""

    def forget_weights(self) -> None:
        """Nothing to forget: it samples from the model itself."""

    @torch.no_grad()
    def generate(self, model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor,
                 cfg: SamplingConfig, weights_version: int | None = None,
                 seeds: Sequence[int] | None = None) -> Samples:
        kwargs = dict(
            max_new_tokens=cfg.max_new_tokens,
            min_new_tokens=cfg.min_new_tokens or None,
            do_sample=not cfg.greedy,
            # Always passed: with min == max the min-length processor then suppresses EOS and
            # the length is forced (None fell back to the model's config and EOS still ended
            # responses early).
            eos_token_id=(self.eos_token_id if len(self.end_ids) == 1 else list(self.end_ids)),
            pad_token_id=self.pad_token_id,
            use_cache=True,
        )
        crn = seeds is not None and not cfg.greedy
        if crn:  # exact sampling as greedy decoding of Gumbel-perturbed logits, row r's
            # noise from seeds[r] (generate's min-length processor acts first, as it does
            # when sampling)
            transform = replace(cfg, min_new_tokens=0).policy_transform(self.end_ids)
            kwargs.update(do_sample=False, logits_processor=LogitsProcessorList(
                [GumbelMax(transform, seeds, prompt_ids.device)]))
        elif not cfg.greedy:
            kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
        # sampled: each data-parallel rank from its own stream (one process: the global RNG)
        with contextlib.nullcontext() if cfg.greedy or crn else rank_rng(prompt_ids.device):
            out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask.long(),
                                 **kwargs)
        response = out[:, prompt_ids.shape[1]:]
        if response.shape[1] == 0:
            response = torch.full((prompt_ids.shape[0], 1), self.eos_token_id,
                                  dtype=prompt_ids.dtype, device=prompt_ids.device)
        mask = mask_after_eos(response, self.end_ids)
        return Samples(response.masked_fill(~mask, self.pad_token_id), mask)
