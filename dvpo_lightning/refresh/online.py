"""Online (iterative) DPO: the DPO policy also trains on pairs of its own responses labelled
during the run, bought by the same label rounds as a GVM refresh (docs/semi-online.md).

Every ``online.every`` optimizer steps a round (:class:`~dvpo_lightning.refresh.rounds.
LabelRounds`) samples two responses of the current policy to fresh prompts and has them
labelled; each prompt whose two labels differ and whose two answers differ becomes a pair, the
better-labelled answer chosen. From then on every training batch gets ``online.batch_pairs``
of the pairs bought so far besides the pairs of the data file. With ``online.every: 0``
nothing here runs: offline DPO.
"""

from __future__ import annotations

import random

from dvpo_lightning.data.pairwise import collate_pairs
from dvpo_lightning.refresh.rounds import LabelRounds, Round
from dvpo_lightning.refresh.settings import OnlineSettings
from dvpo_lightning.runtime.distributed import rank_and_world


class OnlinePairs(LabelRounds):
    """The label rounds of an online DPO run and the pairs they bought.

    The buffer holds every kept pair as two rows, the chosen one first; the draws for a
    training batch come from a stream of their own for every ``(seed, step, micro-batch,
    rank)``, so a resumed run draws what the uninterrupted one did with no state to save but
    the buffer.
    """

    settings: OnlineSettings

    @property
    def n_pairs(self) -> int:
        """Pairs bought so far (ties are not pairs)."""
        return len(self.buffer) // 2

    @staticmethod
    def distinct(bought: Round) -> list[tuple[int, int]]:
        """The round's pairs whose two answers differ: a pair of one answer twice, told apart
        by the annotator's noise alone, has no gradient in the DPO loss and teaches nothing."""
        rows = bought.rows
        return [(c, r) for c, r in bought.pairs if rows[c].response_ids != rows[r].response_ids]

    def keep(self, bought: Round, pairs: list[tuple[int, int]], step: int,
             log: dict[str, float]) -> None:
        """Keep ``pairs`` of a round (chosen row, then rejected row), spend all its labels,
        record ``log`` (the round's entries and the caller's) as the round's history."""
        self.buffer.add([bought.rows[i] for pair in pairs for i in pair])
        self.labels_used += bought.labels
        self.history.append({"step": float(step), **bought.log("online", self.labels_used),
                             "online/pairs_identical": float(len(bought.pairs) - len(pairs)),
                             "online/pairs_kept": float(self.n_pairs), **log})

    def done_after(self, step: int) -> bool:
        """The round after training step ``step`` is bought already (a step's micro-batches
        all see it due)."""
        return bool(self.history) and self.history[-1]["step"] == step

    def draw(self, step: int, micro: int) -> list[tuple[list[int], ...]]:
        """``online.batch_pairs`` bought pairs, with replacement, for micro-batch ``micro`` of
        training step ``step`` on this process, as pair items ``(prompt ids, chosen ids,
        prompt ids, rejected ids)``; ``[]`` before a round has bought any."""
        n = self.n_pairs
        if not n:
            return []
        rank, _ = rank_and_world()
        rng = random.Random(f"online-dpo/{self.settings.seed}/{step}/{micro}/{rank}")
        rows = self.buffer.rows
        picks = [rng.randrange(n) for _ in range(self.settings.batch_pairs)]
        return [(rows[2 * i].prompt_ids, rows[2 * i].response_ids,
                 rows[2 * i + 1].prompt_ids, rows[2 * i + 1].response_ids) for i in picks]

    def batch(self, step: int, micro: int, pad_id: int) -> dict | None:
        """:meth:`draw`'s pairs collated as a DPO training batch; None before any is bought."""
        items = self.draw(step, micro)
        return collate_pairs(items, pad_id) if items else None

    def summary(self) -> dict:
        return {"model": "policy", **super().summary(), "pairs": self.n_pairs,
                "batch_pairs": self.settings.batch_pairs}
