"""Labellers: who labels the samples a semi-online refresh buys (docs/semi-online.md).

A labeller is named in a config (``model.init_args.refresh.labeller``) by

- a **registry name**: ``sorting`` (the embedded task's gold judge; its annotation noise by
  default is the 0.1 the embedded data's scores have), ``instruct`` (the instruction task's
  programmatic judge, exact), or an entry added with :func:`register_labeller`;
- a **callable path** ``package.module:function`` taking ``(prompt, response)`` (and
  ``finished``, if it accepts a third argument) and returning a number, higher is better.

A label is the function's score plus Gaussian annotation noise (``refresh.noise``) from
standard-normal draws the refresh takes from its own stream, one per row whatever the number
of processes, so a resumed run, or one on more processes, draws the same noise. A labeller
that raises or returns something other than a finite number stops the run with one message
naming it, the row, the RL step and the fix; the labels bought before that refresh are in the
last checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dvpo_lightning.tasks.judges import ScoreFn, checked_score, resolve_scorer, takes_finished

KEY = "model.init_args.refresh.labeller"

LABELLERS: dict[str, Callable[[], ScoreFn]] = {}
"""Registry name → a factory of the labeller's scoring function (built on first use)."""

DEFAULT_NOISE: dict[str, float] = {}
"""Registry name → the annotation noise used when ``refresh.noise`` is None."""


def register_labeller(name: str, factory: Callable[[], ScoreFn], noise: float = 0.0) -> None:
    """Add ``name`` to the registry: ``factory()`` returns the scoring function; ``noise`` is
    its default annotation noise."""
    LABELLERS[name] = factory
    DEFAULT_NOISE[name] = noise


def _gold(task: str) -> Callable[[], ScoreFn]:
    def factory() -> ScoreFn:
        from dvpo_lightning.tasks import get_task

        return get_task(task).gold_score

    return factory


# the embedded sorting data's annotator: gold + N(0, 0.1²) (commands/data/sorting.py)
register_labeller("sorting", _gold("sorting"), noise=0.1)
register_labeller("instruct", _gold("instruct"))


@dataclass(frozen=True)
class Labeller:
    """A named scoring function with annotation noise.

    Attributes:
        name: the config value that named it.
        fn: ``(prompt, response[, finished]) ↦ score``.
        takes_finished: ``fn`` accepts ``finished``.
        noise: the standard deviation of the Gaussian noise added to every score.
        key: the config key that named it, for errors.
        round_name: what a label round is called in errors, ``{step}`` standing for its step.
    """

    name: str
    fn: ScoreFn
    takes_finished: bool
    noise: float
    key: str = KEY
    round_name: str = "the refresh after RL step {step}"

    def label(self, prompts: Sequence, responses: Sequence[str], finished: Sequence[bool],
              step: int, z: Sequence[float]) -> list[float]:
        """One label per response: the score plus ``noise · z[row]`` (``z``: standard-normal
        draws, one per row), rounded to 4 places as the embedded data's scores are.
        ``step``: the training step the round follows, for the error."""
        fix = (f"Fix the labeller {self.name!r} ({self.key}) so that it returns a finite number "
               "for every (prompt, response), then resume the run from its last checkpoint "
               "(--ckpt_path last): the labels bought before this round are in it")
        out = []
        for row, (p, r, f, zr) in enumerate(zip(prompts, responses, finished, z, strict=True)):
            value = checked_score(self.fn, self.takes_finished, p, r, f,
                                  f"the labeller {self.name!r}",
                                  f"on row {row} of {self.round_name.format(step=step)}",
                                  "a labeller", fix, LabellerError)
            out.append(round(value + zr * self.noise, 4) if self.noise else value)
        return out


class LabellerError(ValueError):
    """A labeller failed or returned something that is not a label."""


def load_labeller(spec: str, noise: float | None = None, key: str = KEY,
                  round_name: str = Labeller.round_name) -> Labeller:
    """The labeller a config names at ``key`` (see the module docstring); ``noise`` None: its
    default (0 for a callable path); ``round_name``: :class:`Labeller`'s. One ValueError
    naming the key and the fix for anything else."""
    fn = resolve_scorer(spec, key, LABELLERS, "labeller")
    chosen = DEFAULT_NOISE.get(spec, 0.0) if noise is None else noise
    return Labeller(spec, fn, takes_finished(fn), chosen, key, round_name)
