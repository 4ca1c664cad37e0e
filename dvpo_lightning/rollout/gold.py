"""Score generated responses with the run's judge (:mod:`dvpo_lightning.tasks.judges`)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor
from transformers import PreTrainedTokenizerBase

from dvpo_lightning.tasks.judges import Judge


def gold_scores(judge: Judge, tokenizer: PreTrainedTokenizerBase, prompts: list,
                response_ids: Tensor, response_mask: Tensor,
                end_ids: Sequence[int]) -> list[float]:
    """The judge's score of each response (decoded up to its mask; finished iff its last token
    is one of ``end_ids``: the engine's
    :attr:`~dvpo_lightning.rollout.generation.Generator.end_ids`). A judge that raises or
    returns a non-number is one error naming it and the row (:meth:`Judge.score`)."""
    _, texts, done = decoded(tokenizer, response_ids, response_mask, end_ids)
    return [judge.score(p, text, f, row)
            for row, (p, text, f) in enumerate(zip(prompts, texts, done))]


def decoded(tokenizer: PreTrainedTokenizerBase, response_ids: Tensor, response_mask: Tensor,
            end_ids: Sequence[int]) -> tuple[list[list[int]], list[str], list[bool]]:
    """Each response's tokens (up to its mask), its text, and whether it finished (its last
    token is one of ``end_ids``), as a judge or a labeller reads them."""
    tokens = [[t for t, keep in zip(r, m) if keep]
              for r, m in zip(response_ids.tolist(), response_mask.tolist())]
    return (tokens, [tokenizer.decode(t, skip_special_tokens=True) for t in tokens],
            [bool(t) and t[-1] in end_ids for t in tokens])
