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
    out = []
    for row, (p, r, m) in enumerate(zip(prompts, response_ids.tolist(),
                                        response_mask.tolist())):
        toks = [t for t, keep in zip(r, m) if keep]
        finished = bool(toks) and toks[-1] in end_ids
        out.append(judge.score(p, tokenizer.decode(toks, skip_special_tokens=True), finished,
                               row))
    return out
