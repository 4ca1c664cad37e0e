"""Digit sorting: the default embedded task.

Prompt ``"3172="``, correct response ``"1237"`` followed by EOS. The gold scorer credits the
correct prefix: the first wrong token ruins everything after it, so the value of a partial
response changes at a single token — the token-level structure a value model must find.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

DIGITS = "0123456789"


@dataclass(frozen=True)
class SortingTask:
    """Sort a string of digits in ascending order.

    Args:
        min_digits: shortest prompt, in digits.
        max_digits: longest prompt, in digits.
    """

    min_digits: int = 4
    max_digits: int = 8
    name: str = "sorting"
    alphabet: str = DIGITS + "="

    def __post_init__(self) -> None:
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(
                f"SortingTask needs 1 <= min_digits <= max_digits, got {self.min_digits} and "
                f"{self.max_digits}; fix the task arguments"
            )

    def sample_prompt(self, rng: random.Random) -> str:
        n = rng.randint(self.min_digits, self.max_digits)
        return "".join(rng.choice(DIGITS) for _ in range(n)) + "="

    def reference(self, prompt: str) -> str:
        return "".join(sorted(prompt.rstrip("=")))

    def gold_score(self, prompt: str, response: str, finished: bool = True) -> float:
        """Correct-prefix credit: ``k / (n + 1)``, plus the last ``1 / (n + 1)`` for stopping
        right after a fully correct answer; ``n`` digits, ``k`` the correct prefix length.

        So the exact answer with EOS scores 1.0, an empty response 0.0, and any token after the
        first mistake earns nothing.
        """
        target = self.reference(prompt)
        k = 0
        for got, want in zip(response, target):
            if got != want:
                break
            k += 1
        exact = finished and response == target
        return (k + int(exact)) / (len(target) + 1)

    def noisy_response(self, prompt: str, error_rate: float, rng: random.Random,
                       dedup_rate: float = 0.0, stutter_rate: float = 0.0,
                       swap_rate: float = 0.0) -> str:
        """The answer of a teacher with systematic flaws and random slips.

        - ``dedup_rate``: each repeated copy of a digit is left out with this probability
          (above 0.5 the teacher's *most likely* answer is wrong, so even greedy decoding of a
          model that imitates it is wrong: headroom that only RL can recover);
        - ``stutter_rate``: each digit is written twice with this probability (the opposite
          flaw: too long instead of too short, so length alone does not tell good from bad);
        - ``error_rate``: random slips per written digit, in equal parts replacing it by
          another digit, inserting an extra random digit after it, or leaving it out;
        - ``swap_rate``: applied last, to the written answer: two adjacent digits that differ
          are written in the wrong order with this probability, position by position (only
          different digits, so a swap always changes the answer; a swapped pair is not swapped
          again). At 0 no random number is drawn for it: the answer and the ``rng`` state are
          those of a call without it.
        """
        ref = self.reference(prompt)
        out = []
        for i, ch in enumerate(ref):
            if i and ch == ref[i - 1] and rng.random() < dedup_rate:
                continue
            if rng.random() < error_rate:
                kind = rng.random()
                if kind < 1 / 3:
                    out.append(rng.choice(DIGITS.replace(ch, "")))
                elif kind < 2 / 3:
                    out += [ch, rng.choice(DIGITS)]
                continue
            out.append(ch)
            if rng.random() < stutter_rate:
                out.append(ch)
        if swap_rate:
            i = 0
            while i + 1 < len(out):
                if out[i] != out[i + 1] and rng.random() < swap_rate:
                    out[i], out[i + 1] = out[i + 1], out[i]
                    i += 2
                else:
                    i += 1
        return "".join(out)
