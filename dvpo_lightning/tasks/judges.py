"""Judges: what scores a response to a prompt in held-out evaluation, win rates and the
rollouts' gold curve, without a model of our own.

A judge is named in a config (``model.init_args.judge``) by

- a **registry name**: an embedded task's gold scorer (``sorting``, ``instruct``), or an entry a
  user added with :func:`register_judge`;
- a **callable path** ``package.module:function``: any importable function (or class with a
  ``__call__``, instantiated without arguments) taking ``(prompt, response)`` and returning a
  number, higher is better; it may also take ``finished``, False when the response was cut at
  the token budget before its end token.

:func:`load_judge` resolves either to a :class:`Judge`, which names itself in every error: a
judge that raises or returns something other than a finite number on a row stops the run with
one message naming the judge, the row and the fix.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

ScoreFn = Callable[..., float]
"""``(prompt, response[, finished]) ↦ score``."""

JUDGES: dict[str, Callable[[], ScoreFn]] = {}
"""Registry name → a factory of the judge's scoring function (built on first use)."""


def register_judge(name: str, factory: Callable[[], ScoreFn]) -> None:
    """Add ``name`` to the registry: ``factory()`` returns the scoring function."""
    JUDGES[name] = factory


def _embedded(task: str) -> Callable[[], ScoreFn]:
    def factory() -> ScoreFn:
        from dvpo_lightning.tasks import get_task

        return get_task(task).gold_score

    return factory


EMBEDDED = ("sorting", "instruct")
for _task in EMBEDDED:
    register_judge(_task, _embedded(_task))


@dataclass(frozen=True)
class Judge:
    """A named scoring function.

    Attributes:
        name: the config value that named it (a registry name or ``module:function``).
        fn: ``(prompt, response[, finished]) ↦ score``.
        takes_finished: ``fn`` accepts ``finished``.
        embedded: an embedded task's gold scorer (scores in ``[0, 1]``, 1 for a right answer:
            the evaluation also reports the exact-answer rate).
    """

    name: str
    fn: ScoreFn
    takes_finished: bool
    embedded: bool = False

    def score(self, prompt, response: str, finished: bool, row: int) -> float:
        """``fn``'s score of one response as a float; one error naming the judge and ``row``
        (the response's index in its batch) when it raises or returns a non-number."""
        fix = (f"Fix the judge {self.name!r} (model.init_args.judge) so that it returns a "
               "finite number for every (prompt, response), or set model.init_args.judge=null "
               "to evaluate without one")
        return checked_score(self.fn, self.takes_finished, prompt, response, finished,
                             f"the judge {self.name!r}", f"on row {row}", "a judge", fix)


def checked_score(fn: ScoreFn, with_finished: bool, prompt, response: str, finished: bool,
                  who: str, where: str, kind: str, fix: str,
                  error: type[Exception] = ValueError) -> float:
    """``fn``'s score of one response as a float. One ``error`` naming ``who`` (``the judge
    'x'``), ``where`` (the row), the prompt and response, and ``fix`` when ``fn`` raises or
    returns something other than a finite number (``kind``: what must return one)."""
    at = f"{where} (prompt {_short(prompt)}, response {_short(response)})"
    try:
        value = fn(prompt, response, finished) if with_finished else fn(prompt, response)
    except Exception as e:
        raise error(f"{who} raised {type(e).__name__}: {e} {at}. {fix}") from e
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(
            float(value)):
        raise error(f"{who} returned {value!r} ({type(value).__name__}) {at}; {kind} returns a "
                    f"finite number. {fix}")
    return float(value)


def _short(text, n: int = 60) -> str:
    text = repr(text)
    return text if len(text) <= n else text[:n - 3] + "..."


def load_judge(spec: str) -> Judge:
    """The judge a config names: a registry name or ``package.module:function`` (see the module
    docstring). Raises one ValueError naming the key and the fix for anything else."""
    fn = resolve_scorer(spec, "model.init_args.judge", JUDGES, "judge", "or null for no judge")
    return Judge(spec, fn, takes_finished(fn), embedded=spec in JUDGES and spec in EMBEDDED)


def resolve_scorer(spec: str, key: str, registry: dict[str, Callable[[], ScoreFn]], what: str,
                   otherwise: str = "") -> ScoreFn:
    """The scoring function ``spec`` names: a ``registry`` entry (built by its factory) or an
    importable ``package.module:function`` (a class is instantiated without arguments). One
    ValueError naming ``key`` (the config key) and the fix for anything else; ``what`` names
    the kind (``judge``, ``labeller``), ``otherwise`` ends the fix of an unknown name."""
    if spec in registry:
        return registry[spec]()
    elif ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"{key}={spec!r}: cannot import {module_name!r} ({e}). Fix: make the "
                             "module importable (installed, or on PYTHONPATH)") from e
        fn = module
        for part in attr.split("."):
            fn = getattr(fn, part, None)
        if fn is None:
            raise ValueError(f"{key}={spec!r}: {module_name!r} has no {attr!r}. Fix: name a "
                             "function defined in that module")
        if inspect.isclass(fn):
            fn = fn()
        if not callable(fn):
            raise ValueError(f"{key}={spec!r} is not callable. Fix: name a function taking "
                             "(prompt, response) and returning a number")
    else:
        known = ", ".join(sorted(registry))
        raise ValueError(f"{key}={spec!r} is neither a registered {what} ({known}) nor a "
                         f"'package.module:function' path. Fix: use one of those"
                         + (f", {otherwise}" if otherwise else ""))
    return fn


def takes_finished(fn: ScoreFn) -> bool:
    """``fn`` accepts ``finished`` (a third argument)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature: two arguments
        return False
    positional = [p for p in params.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return "finished" in params or len(positional) >= 3 or any(
        p.kind == p.VAR_POSITIONAL for p in params.values())
