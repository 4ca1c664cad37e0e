"""Judge generated responses with an embedded task's gold scorer."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor
from transformers import PreTrainedTokenizerBase

from dvpo_lightning.tasks.base import Task


def gold_scores(task: Task, tokenizer: PreTrainedTokenizerBase, prompts: list,
                response_ids: Tensor, response_mask: Tensor,
                end_ids: Sequence[int]) -> list[float]:
    """The gold score of each response (decoded up to its mask; finished iff its last token is
    one of ``end_ids``: the engine's
    :attr:`~dvpo_lightning.rollout.generation.Generator.end_ids`)."""
    out = []
    for p, r, m in zip(prompts, response_ids.tolist(), response_mask.tolist()):
        toks = [t for t, keep in zip(r, m) if keep]
        finished = bool(toks) and toks[-1] in end_ids
        out.append(task.gold_score(p, tokenizer.decode(toks, skip_special_tokens=True),
                                   finished))
    return out
