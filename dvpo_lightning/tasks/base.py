"""What an embedded task provides: prompts, a gold scorer and behaviour policies.

An embedded task needs no download: it makes its own prompts, knows the right answer, and its
gold scorer plays the role of the human judge (the paper's GPT-4 / human evaluation).
"""

from __future__ import annotations

import random
from typing import Protocol


class Task(Protocol):
    """An embedded task (see :mod:`dvpo_lightning.tasks.sorting`)."""

    name: str
    alphabet: str

    def sample_prompt(self, rng: random.Random) -> str:
        """A random prompt string."""

    def reference(self, prompt: str) -> str:
        """The correct response to ``prompt`` (without EOS)."""

    def gold_score(self, prompt: str, response: str, finished: bool = True) -> float:
        """The judge's score of ``response`` in ``[0, 1]``; ``finished`` is False when the
        response was cut before its EOS."""

    def noisy_response(self, prompt: str, error_rate: float, rng: random.Random,
                       dedup_rate: float = 0.0) -> str:
        """A response from a noisy teacher: random slips at ``error_rate`` per token and a
        task-specific systematic flaw at ``dedup_rate``."""
