"""Verifiable instructions: the embedded task ``instruct``.

A prompt is a request about an everyday topic followed by checkable constraints, one a line::

    Give advice on saving money.
    Answer in at most 40 words.
    Include the words "budget" and "bank".

The prompt describes itself: the judge parses the constraint lines back
(:func:`~dvpo_lightning.tasks.instruct.constraints.constraints_of`) and checks each one with a
program, so any prompt written in this form can be scored. Unlike ``sorting`` the task has no
single right answer and no character vocabulary: the policy is a pretrained instruct model with
its own tokenizer, and its training responses are sampled from a model (``make_instruct_data``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from dvpo_lightning.tasks.instruct.constraints import (
    MAX_CONSTRAINTS,
    Constraint,
    constraints_of,
    sample_constraints,
)
from dvpo_lightning.tasks.instruct.topics import REQUEST_FORMS, TOPICS

_NO_REFERENCE = (
    "the instruct task has no single reference answer: many responses satisfy its constraints, "
    "so its training responses are sampled from a model (see make_instruct_data) and judged "
    "with InstructTask.gold_score"
)


@dataclass(frozen=True)
class InstructTask:
    """Follow an instruction under checkable constraints (word count, bullets, keywords, ...).

    Args:
        min_constraints: fewest constraints in a prompt (at least 1).
        max_constraints: most constraints in a prompt (at most
            :data:`~dvpo_lightning.tasks.instruct.constraints.MAX_CONSTRAINTS`, the largest
            set of kinds that may share a prompt).
        name: the task's name.
        alphabet: unused (empty): this task uses the policy model's own tokenizer.
    """

    min_constraints: int = 1
    max_constraints: int = 3
    name: str = "instruct"
    alphabet: str = ""

    def __post_init__(self) -> None:
        lo, hi = self.min_constraints, self.max_constraints
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi)):
            raise ValueError(f"InstructTask needs integer min_constraints and max_constraints, "
                             f"got {lo!r} and {hi!r}; pass whole numbers such as 1 and 3")
        if not 1 <= lo <= hi <= MAX_CONSTRAINTS:
            raise ValueError(
                f"InstructTask needs 1 <= min_constraints <= max_constraints <= "
                f"{MAX_CONSTRAINTS} (the largest set of constraint kinds that can share a "
                f"prompt), got {lo} and {hi}; fix the task arguments")

    def sample_with_constraints(self, rng: random.Random) -> tuple[str, list[Constraint]]:
        """A random prompt and the constraints written in it (in prompt order).

        The prompt is a request line (a form of ``REQUEST_FORMS`` about a topic of ``TOPICS``)
        then one line per constraint, its rendered text; ``constraints_of(prompt)`` returns
        the same list. Deterministic given the state of ``rng``.
        """
        topic = rng.choice(tuple(TOPICS))
        request = rng.choice(REQUEST_FORMS).format(topic=topic)
        n = rng.randint(self.min_constraints, self.max_constraints)
        cons = sample_constraints(rng, topic, n)
        return "\n".join([request] + [c.render() for c in cons]), cons

    def sample_prompt(self, rng: random.Random) -> str:
        """A random prompt (see :meth:`sample_with_constraints`), a plain string."""
        return self.sample_with_constraints(rng)[0]

    def constraints_of(self, prompt: str) -> list[Constraint]:
        """The constraints written in ``prompt`` (ValueError when it has none)."""
        return constraints_of(prompt)

    def check(self, prompt: str, response: str) -> list[tuple[str, bool]]:
        """``(rendered constraint, satisfied)`` for each constraint of ``prompt``, in order."""
        return [(c.render(), c.check(response)) for c in constraints_of(prompt)]

    def gold_score(self, prompt: str, response: str, finished: bool = True) -> float:
        """``(satisfied + int(finished)) / (n + 1)`` for the ``n`` constraints of ``prompt``.

        Finishing the answer (ending in EOS rather than being cut at the token budget) is one
        more check, as the sorting task credits stopping. So a finished answer that keeps every
        constraint scores 1.0, and with 2 constraints of which 1 is kept a finished answer
        scores 2/3 and a cut one 1/3. Every constraint fails a response without any letter or
        digit, so an empty finished response scores ``1 / (n + 1)``.
        """
        cons = constraints_of(prompt)
        kept = sum(c.check(response) for c in cons)
        return (kept + int(finished)) / (len(cons) + 1)

    def reference(self, prompt: str) -> str:
        """Not available: raises NotImplementedError (no single right answer)."""
        raise NotImplementedError(_NO_REFERENCE)

    def noisy_response(self, prompt: str, error_rate: float, rng: random.Random,
                       dedup_rate: float = 0.0) -> str:
        """Not available: raises NotImplementedError (no reference to add noise to)."""
        raise NotImplementedError(_NO_REFERENCE)
