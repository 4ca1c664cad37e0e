"""Judge generated responses with an embedded task's gold scorer."""

from __future__ import annotations

from torch import Tensor
from transformers import PreTrainedTokenizerBase

from dvpo_lightning.tasks.base import Task


def gold_scores(task: Task, tokenizer: PreTrainedTokenizerBase, prompts: list,
                response_ids: Tensor, response_mask: Tensor) -> list[float]:
    """The gold score of each response (decoded up to its mask; finished iff it ends in EOS)."""
    out = []
    for p, r, m in zip(prompts, response_ids.tolist(), response_mask.tolist()):
        toks = [t for t, keep in zip(r, m) if keep]
        finished = bool(toks) and toks[-1] == tokenizer.eos_token_id
        out.append(task.gold_score(p, tokenizer.decode(toks, skip_special_tokens=True),
                                   finished))
    return out
