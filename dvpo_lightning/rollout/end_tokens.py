"""What ends a response: one set of token ids, used by every engine, the response mask, the
EOS-rate measures, the gold scorer's "finished" and the data collators' checks.

A model's generation config may list several end tokens (every Llama-3.x-Instruct lists three;
an SFT model whose tokenizer's EOS was changed lists the old one too). ``generate`` stops on the
ids it is given and vLLM on every id of the generation config it reads, so the two engines cut
responses at different places unless both are given the same set: :func:`end_token_ids`.
The tokenizer's EOS comes first: it is the token the collators append to training targets.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def end_token_ids(tokenizer, source=None) -> tuple[int, ...]:
    """The ids that end a response: the tokenizer's EOS first, then every id of the generation
    config's ``eos_token_id`` (an int or a list), each once, in order.

    Args:
        tokenizer: anything with ``eos_token_id`` (None is skipped).
        source: the policy (its ``generation_config``; a peft wrapper's base model's), a
            ``GenerationConfig`` / model config (its ``eos_token_id``), or None (the tokenizer's
            EOS alone).
    """
    from dvpo_lightning.models.loading import unwrapped

    if source is not None and hasattr(source, "get_base_model"):
        source = unwrapped(source)
    config = getattr(source, "generation_config", source)
    listed = getattr(config, "eos_token_id", None)
    listed = [] if listed is None else [listed] if isinstance(listed, int) else list(listed)
    ids = [tokenizer.eos_token_id, *listed]
    out = tuple(dict.fromkeys(int(i) for i in ids if i is not None))
    if not out:
        raise ValueError("no token ends a response: the tokenizer has no eos_token_id and the "
                         "policy's generation config lists none. Fix: give the tokenizer an EOS "
                         "token (tokenizer.eos_token) or set generation_config.eos_token_id")
    return out


def as_end_ids(ids: int | Sequence[int]) -> tuple[int, ...]:
    """``ids`` as a tuple (an int is a set of one)."""
    return (int(ids),) if isinstance(ids, int) else tuple(int(i) for i in ids)


def is_end(token_ids: Tensor, end_ids: int | Sequence[int]) -> Tensor:
    """``token_ids``' shape, bool: True where the token is one of ``end_ids``."""
    ends = as_end_ids(end_ids)
    if len(ends) == 1:
        return token_ids == ends[0]
    return torch.isin(token_ids, torch.tensor(ends, device=token_ids.device,
                                              dtype=token_ids.dtype))


def finished(response_ids: Tensor, response_mask: Tensor,
             end_ids: int | Sequence[int]) -> Tensor:
    """``(B,) bool``: the response was ended by an end token (one lies inside its mask) rather
    than cut at the length limit."""
    return (is_end(response_ids, end_ids) & response_mask.bool()).any(1)
