"""Padding into the one layout every stage shares.

``[left-padded prompt (B, P) | right-padded response (B, T)]``: the last prompt token sits in
column ``P - 1`` of every row, so ``u_0 … u_T`` are ``values[:, P-1:]`` and the logits that
predict ``y_1 … y_T`` are ``logits[:, P-1:-1]`` — no per-row gathering
(docs/algorithm.md#token-alignment).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _pad(seqs: list[list[int]], pad_id: int, left: bool) -> tuple[Tensor, Tensor]:
    """Pad every row to the longest in one ``torch.tensor`` call (a Python slice assignment
    per row cost a tiny model's step about 2 ms of its 50–70)."""
    width = max(len(s) for s in seqs)
    if left:
        rows = [[pad_id] * (width - len(s)) + list(s) for s in seqs]
    else:
        rows = [list(s) + [pad_id] * (width - len(s)) for s in seqs]
    lengths = torch.tensor([len(s) for s in seqs])
    columns = torch.arange(width)
    if left:
        mask = columns.unsqueeze(0) >= (width - lengths).unsqueeze(1)
    else:
        mask = columns.unsqueeze(0) < lengths.unsqueeze(1)
    return torch.tensor(rows, dtype=torch.long).reshape(len(seqs), width), mask


def pad_left(seqs: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """``(B, P) long`` ids and ``(B, P) bool`` mask, padded on the left."""
    return _pad(seqs, pad_id, left=True)


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """``(B, T) long`` ids and ``(B, T) bool`` mask, padded on the right."""
    return _pad(seqs, pad_id, left=False)


def collate_prompt_response(prompts: list[list[int]], responses: list[list[int]],
                            pad_id: int) -> dict[str, Tensor]:
    """The shared layout: ``prompt_ids/prompt_mask (B, P)``, ``response_ids/response_mask
    (B, T)``."""
    prompt_ids, prompt_mask = pad_left(prompts, pad_id)
    response_ids, response_mask = pad_right(responses, pad_id)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
            "response_ids": response_ids, "response_mask": response_mask}


def join(prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
         response_mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(B, P + T)`` input ids and attention mask of the shared layout."""
    return (torch.cat([prompt_ids, response_ids], dim=1),
            torch.cat([prompt_mask, response_mask], dim=1))
